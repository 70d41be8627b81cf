"""Every loss on the corrupted digits, over seeds, beside honest baselines; and each loss's train-step time.

The demo's setting: timm resnet18 (1 input channel) with linear exits after layer1..layer3, the
corrupted digits (`timm_exits.data.corrupted_digits(seed=0)`: 6,468 train / 1,614 validation /
2,700 test images, split by scan), AdamW + one-cycle, 8 epochs, batch 64, CPU. Seed s fixes the
initial weights (the same for every loss) and the batch order. Per seed it trains:

- every loss (`create_loss(name)` defaults); EKD's teacher is the seed's baseline;
- the baseline: the plain resnet18 alone, cross entropy;
- for each early exit, a narrower resnet18 (channels scaled in eighths) of about its FLOPs;
- the limited-label setting (20 labels per class, `DigitsTask.limited`): per-exit CE and
  Phuong & Lampert's distillation on the 200 labeled images alone, the distillation again with
  the 6,268 unlabeled images beside them (its semi-supervised extension), and the plain backbone
  on the labeled images; every run takes the same number of optimizer steps.

Recorded per run (appended to a JSON file as each finishes, so an interrupted study resumes):
test accuracy per exit, the anytime ensemble's, validation accuracy per exit after every epoch,
and the budgeted curve (thresholds calibrated on validation, accuracy on test) at 20 fixed budgets.
`--report` prints the tables, the per-claim verdicts and the figure from that file.

    python benchmarks/loss_study.py [--seeds 0 1 2 3 4] [--epochs 8] [--results F] [--report] [--figure F]
    python benchmarks/loss_study.py --steps-only [--repeats 40]

With ``--data fashion-mnist`` the same study runs on Fashion-MNIST read from disk
(`timm_exits.data.fashion_mnist`: Debian's package, or ``--data-root``), on ``--train-size``
training images (default 4,000, 4 epochs: three seeds in about three hours on two cores) with 2,000
more kept for validation and the 10,000 test images, 1x28x28; it adds each loss's authors' preset
where one exists, times the first seed's EED model early-exiting, and its report sets every claim's
verdict beside the corrupted digits' (read from the digits' results file).

    python benchmarks/loss_study.py --data fashion-mnist [--seeds 0 1 2] [--epochs 4] [--train-size 4000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import timm_exits
from common import batches, cpu_name, interval
from timm_exits.calibration import budgeted_curve, collect_exit_logits
from timm_exits.data import corrupted_digits, fashion_mnist
from timm_exits.demo import early_exit_tradeoff, evaluate, fit, narrower
from timm_exits.runtime import exit_costs

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ["ce", "sdn", "distillation", "eed", "byot", "msd", "mate", "ekd"]
LIMITED = ["limited/baseline", "limited/ce", "limited/distillation", "limited/distillation+unlabeled"]
# the authors' presets (timm_exits.losses.presets) run beside the defaults on Fashion-MNIST
PRESETS = ["sdn/authors", "distillation/authors", "eed/authors", "byot/authors"]
MODEL, STAGES, EPOCHS, BATCH, SIZE = "resnet18", [1, 2, 3], 8, 64, (1, 32, 32)
BUDGETS = 20
DIGITS_RESULTS = ROOT / "benchmarks/results/loss_study.json"
TIMING_ROUNDS = 5  # alternating rounds per timing; three left one round's noise visible in the no-exit row
TIMED = "eed"  # the loss whose first-seed model is timed early-exiting on Fashion-MNIST (the demo's default loss)
# Sized to about three hours of training for three seeds on two cores (a multi-exit resnet18 trains
# about 110 images a second there at 1x28x28): 4,000 training images, 4 epochs, 2,000 for validation.
FASHION_TRAIN, FASHION_VAL, FASHION_EPOCHS = 4000, 2000, 4


def plain(seed: int, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False, num_classes=10, in_chans=1, **kwargs)


def multi_exit(seed: int, size=SIZE) -> timm_exits.MultiExitModel:
    return timm_exits.wrap(plain(seed), stages=STAGES, input_size=size)


def preset_loss(key: str, model: timm_exits.MultiExitModel, size, epochs: int):
    """The loss of a ``name/authors`` key in its authors' configuration; the feature terms get each exit's feature width."""
    name = key.split("/")[0]
    kwargs = {}
    if name in ("eed", "byot"):  # their presets add a feature term, whose adapters need each exit's feature width
        model.eval()
        with torch.no_grad():
            kwargs["feature_dims"] = [f.shape[1] for f in model(torch.zeros(1, *size), return_features=True).features]
    return timm_exits.create_loss(name, num_exits=model.num_exits, epochs=epochs, preset="authors", **kwargs)


def repeated(x: torch.Tensor, y: torch.Tensor, length: int):
    """`x`, `y` tiled to `length` rows: a small labeled set trained for as many steps as the full one."""
    idx = torch.arange(length) % len(x)
    return x[idx], y[idx]


def record(model, task, epochs_val: list, budgets: list[float], seconds: float) -> dict:
    out = {"val_by_epoch": epochs_val, "seconds": seconds}
    if not isinstance(model, timm_exits.MultiExitModel):
        out["test"] = evaluate(model, task.test.x, task.test.y)
    else:
        val, test = collect_exit_logits(model, batches(task.val)), collect_exit_logits(model, batches(task.test))
        out["test"] = [float(v) for v in (test.predictions() == test.labels).double().mean(1).tolist()]  # each exit's, one pass
        out["anytime_ensemble"] = [float(v) for v in ((test.predictions(True) == test.labels).double().mean(1)).tolist()]
        curve = budgeted_curve(val, budgets, evaluate_on=test)
        out["curve"], out["curve_flops"] = [p.accuracy for p in curve], [p.flops for p in curve]
    return out


def train(model, loss_fn, x, y, task, epochs: int, seed: int, teacher=None, batch: int = BATCH) -> tuple[list, float]:
    val_by_epoch = []
    start = time.perf_counter()
    torch.manual_seed(seed)  # the same batch order for every run of a seed
    features = float(getattr(loss_fn, "feature_weight", 0.0) or 0.0) > 0
    fit(model, loss_fn, x, y, epochs, batch, teacher=teacher, features=features,
        on_epoch=lambda epoch, loss: val_by_epoch.append(evaluate(model, task.val.x, task.val.y)))
    return val_by_epoch, time.perf_counter() - start


def load_task(data: str, variants: int = 6, train_size: int | None = None, root=None):
    """The study's task: the corrupted digits, or Fashion-MNIST from disk (`train_size` training images, 2,000 for validation)."""
    if data == "digits":
        return corrupted_digits(seed=0, variants=variants)
    return fashion_mnist(root, seed=0, train_size=FASHION_TRAIN if train_size is None else train_size, val_size=FASHION_VAL)


def run_study(seeds, epochs: int, path: str, log, variants: int = 6, data: str = "digits", train_size: int | None = None,
              root=None) -> dict:
    results = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    task = load_task(data, variants, train_size, root)
    size = tuple(task.train.x.shape[1:])
    x, y = task.train.tensors()
    x_lab, y_lab = repeated(*task.limited(unlabeled=False).tensors(), len(x))
    unlabeled = task.train.subset(~task.labeled)
    # the semi-supervised run sees the same labeled stream plus the unlabeled images: batches twice
    # as large, about as many steps
    x_semi, y_semi = torch.cat([x_lab, unlabeled.x]), torch.cat([y_lab, torch.full_like(unlabeled.y, -100)])
    costs = exit_costs(multi_exit(0, size), size)  # backbone to exit k plus heads 0..k, as early exit spends
    budgets = [costs[0] + (costs[-1] - costs[0]) * i / (BUDGETS - 1) for i in range(BUDGETS)]
    settings = {"model": MODEL, "stages": STAGES, "epochs": epochs, "batch": BATCH, "variants": variants}
    if data != "digits":  # the digits' results file predates these keys
        settings = {"model": MODEL, "stages": STAGES, "epochs": epochs, "batch": BATCH, "data": data, "train": len(task.train)}
    if "meta" in results and results["meta"]["settings"] != settings:
        raise SystemExit(f"{path} holds a study with {results['meta']['settings']}, not {settings}: "
                         "give another --results to start a new one")
    backbone = timm_exits.flops_report(multi_exit(0, size)).backbone_flops
    results["meta"] = {"settings": settings, "epochs": epochs, "batch": BATCH, "stages": STAGES, "flops": costs, "backbone_flops": backbone,
                       "budgets": budgets, "train": len(task.train), "val": len(task.val), "test": len(task.test),
                       "labeled": int(task.labeled.sum()), "data": task.name, "size": list(size)}

    def save(key, seed, value):
        results.setdefault(key, {})[str(seed)] = value
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
        log(f"seed {seed} {key:<32} test " + " ".join(f"{a:.4f}" for a in value["test"]) + f"  ({value['seconds']:.0f}s)")

    def pending(key, seed):
        return str(seed) not in results.get(key, {})

    def time_early_exit(model, seed):
        """Early exit of this model at five budgets (the demo's trade-off), timed three ways, kept under "early_exit"."""
        out = early_exit_tradeoff(model, task, budgets=5, log=log, repeats=TIMING_ROUNDS, progress=False)
        keys = ("budget", "accuracy", "flops", "exit_shares", "measured", "measured_per_batch", "time_predicted", "flops_predicted")
        results["early_exit"] = {"seed": seed, "loss": TIMED, "repeats": TIMING_ROUNDS, "batch": 64, "threads": torch.get_num_threads(),
                                 "budgets": [{k: row[k] for k in keys} for row in out["budgets"]],
                                 "segment_seconds": list(out["profile"].segment_seconds)}
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)

    for seed in seeds:
        teacher = None
        if pending("baseline", seed) or pending("ekd", seed):
            teacher = plain(seed)
            curve, seconds = train(teacher, F.cross_entropy, x, y, task, epochs, seed)
            save("baseline", seed, record(teacher, task, curve, budgets, seconds))
        for name in LOSSES + (PRESETS if data != "digits" else []):
            timed = name == TIMED and data != "digits" and "early_exit" not in results
            if pending(name, seed) or timed:
                model = multi_exit(seed, size)
                loss_fn = (preset_loss(name, model, size, epochs) if name in PRESETS
                           else timm_exits.create_loss(name, num_exits=model.num_exits, epochs=epochs))
                curve, seconds = train(model, loss_fn, x, y, task, epochs, seed, teacher=teacher if name == "ekd" else None)
                if pending(name, seed):
                    save(name, seed, record(model, task, curve, budgets, seconds))
                if timed:
                    time_early_exit(model, seed)
        for k, cost in enumerate(costs[:-1], start=1):
            key = f"smaller@exit{k}"
            if pending(key, seed):
                torch.manual_seed(seed)
                model, channels = narrower(MODEL, cost, size, num_classes=10, in_chans=1)
                curve, seconds = train(model, F.cross_entropy, x, y, task, epochs, seed)
                value = record(model, task, curve, budgets, seconds)
                value.update(channels=list(channels), flops=timm_exits.flops_report(model, input_size=size).backbone_flops)
                save(key, seed, value)
        for key in LIMITED:
            if pending(key, seed):
                if key == "limited/baseline":
                    model, loss_fn, data = plain(seed), F.cross_entropy, (x_lab, y_lab)
                else:
                    model = multi_exit(seed, size)
                    loss_fn = timm_exits.create_loss(key.split("/")[1].split("+")[0], num_exits=model.num_exits, epochs=epochs)
                    data = (x_semi, y_semi) if key.endswith("+unlabeled") else (x_lab, y_lab)
                batch = 2 * BATCH if key.endswith("+unlabeled") else BATCH
                curve, seconds = train(model, loss_fn, *data, task, epochs, seed, batch=batch)
                save(key, seed, record(model, task, curve, budgets, seconds))
    return results


# -- the report ------------------------------------------------------------------------------------


def fmt(values, scale=100.0) -> str:
    if not values:
        return "–"
    mean, half = interval([scale * v for v in values])
    return f"{mean:.2f} ± {half:.2f}" + ("" if len(values) == SEEDS_SHOWN[0] else f" (n={len(values)})")


SEEDS_SHOWN = [0]  # the seed count of the report's header; a cell over fewer seeds says how many


def runs(results, key) -> dict[str, dict]:
    return results.get(key, {})


def column(results, key, field, index) -> list[float]:
    return [r[field][index] for r in runs(results, key).values()]


def common(results, *keys) -> list[str]:
    return sorted(set.intersection(*(set(runs(results, k)) for k in keys)), key=int)


def paired(results, a, b, field, index, seeds=None) -> list[float]:
    """Per-seed differences a - b (same initial weights and batch order), over the seeds both have (or `seeds`)."""
    ra, rb = runs(results, a), runs(results, b)
    return [ra[s][field][index] - rb[s][field][index] for s in (seeds if seeds is not None else common(results, a, b))]


def verdict(parts: list[list[float]]) -> str:
    """confirmed: every part's interval lies on the claimed side of 0; contradicted: one lies on the other side; else not seen."""
    if not parts or any(len(p) < 2 for p in parts):
        return "not seen (fewer than two common seeds)"
    bounds = [interval(d) for d in parts]
    if all(m - h > 0 for m, h in bounds):
        return "confirmed"
    if any(m + h < 0 for m, h in bounds):
        return "contradicted"
    return "not seen"


def diff(values) -> str:
    if len(values) < 2:
        return "–"
    mean, half = interval([100 * v for v in values])
    return f"{mean:+.2f} ± {half:.2f}" + ("" if len(values) == SEEDS_SHOWN[0] else f" (n={len(values)})")


def report(results: dict, figure: str | None, beside: dict | None = None) -> None:
    """Print the tables and the claims' verdicts; `beside`, another study's results, adds its verdicts in a column of their own."""
    meta = results["meta"]
    n_exits = len(meta["flops"])
    seeds = sorted(runs(results, "ce"), key=int)
    SEEDS_SHOWN[0] = len(seeds)
    data = meta.get("data", "corrupted digits")
    print(f"{data[0].upper() + data[1:]}: {meta['train']} train / {meta['val']} validation / {meta['test']} test images; "
          f"{MODEL}, exits after stages {meta['stages']}, {meta['epochs']} epochs, batch {meta['batch']}; seeds {', '.join(seeds)}. "
          "Mean ± half-width of the 95 % t interval over seeds, in %.\n")
    names = [f"exit {k + 1} ({f / 1e6:.1f} MFLOPs)" for k, f in enumerate(meta["flops"])]
    print("Test accuracy per exit:\n")
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * n_exits)
    for name in LOSSES + PRESETS:
        if runs(results, name):
            label = f"{name.split('/')[0]}, authors' preset" if name in PRESETS else name
            print(f"| {label} | " + " | ".join(fmt(column(results, name, "test", k)) for k in range(n_exits)) + " |")
    for name in LOSSES:
        if runs(results, name):
            print(f"| {name}, anytime ensemble | "
                  + " | ".join(fmt(column(results, name, "anytime_ensemble", k)) for k in range(n_exits)) + " |")
    print(f"| baseline: {MODEL} alone, CE | " + " | " * (n_exits - 1) + fmt(column(results, "baseline", "test", 0)) + " |")
    if data == "Fashion-MNIST":
        print(f"\nPublished for {MODEL} on Fashion-MNIST, to show how far from convergence {meta['train']} images x "
              f"{meta['epochs']} epochs is: 94.9 % in Zalando's benchmark table (zalandoresearch/fashion-mnist README: "
              "normalization, random flips, translation and rotation; submitted by K. Efthymiadis) and 92.0 % in the "
              "submitter's own README (kefth/fashion-mnist: its train.py takes all 60,000 images, no augmentation, Adam, "
              "batch 256, up to 200 epochs, stopping once 5 pass without a lower loss on the training images). "
              "Here: no augmentation, AdamW + one-cycle, batch 64.")
    print("\nSmaller plain models (narrower resnet18, CE) at about each early exit's FLOPs:\n")
    print("| model | MFLOPs | test accuracy | the exit it matches, best loss (accuracy) |")
    print("|---|---|---|---|")
    for k in range(n_exits - 1):
        key = f"smaller@exit{k + 1}"
        if runs(results, key):
            any_run = next(iter(runs(results, key).values()))
            best = max(LOSSES, key=lambda n: statistics.fmean(column(results, n, "test", k)) if runs(results, n) else -1)
            print(f"| channels {tuple(any_run['channels'])} | {any_run['flops'] / 1e6:.1f} | {fmt(column(results, key, 'test', 0))} "
                  f"| exit {k + 1}: {best} {fmt(column(results, best, 'test', k))} |")
    print("\nValidation accuracy by epoch, mean over exits and seeds (the last exit alone for the baseline):\n")
    epochs = meta["epochs"]
    print("| method | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |")
    print("|---|" + "---|" * epochs)
    for name in LOSSES + ["baseline"]:
        if runs(results, name):
            by_epoch = [statistics.fmean(statistics.fmean(r["val_by_epoch"][e]) for r in runs(results, name).values())
                        for e in range(epochs)]
            print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in by_epoch) + " |")
    print(f"\nLimited labels ({meta['labeled']} labeled training images; "
          f"the unlabeled setting adds the other {meta['train'] - meta['labeled']}), test accuracy:\n")
    print("| method | " + " | ".join(f"exit {k + 1}" for k in range(n_exits)) + " |")
    print("|---|" + "---|" * n_exits)
    for key in LIMITED:
        if runs(results, key):
            cells = [fmt(column(results, key, "test", k)) for k in range(len(next(iter(runs(results, key).values()))["test"]))]
            print(f"| {key} | " + " | ".join(([""] * (n_exits - 1) if len(cells) == 1 else []) + cells) + " |")
    print("\nBudgeted accuracy on test (thresholds calibrated on validation), mean over seeds, at five of the 20 budgets:\n")
    picks = [0, 5, 10, 15, BUDGETS - 1]
    print("| method | " + " | ".join(f"{meta['budgets'][i] / 1e6:.1f} MFLOPs" for i in picks) + " |")
    print("|---|" + "---|" * len(picks))
    for name in LOSSES:
        if runs(results, name):
            print(f"| {name} | " + " | ".join(fmt(column(results, name, "curve", i)) for i in picks) + " |")
    if "early_exit" in results:
        timed = results["early_exit"]
        print(f"\nEarly exit of the seed-{timed['seed']} {timed['loss']} model, thresholds calibrated on validation (MSDNet's budgeted "
              f"batch), on the test split in batches of {timed['batch']}; speedup over the plain backbone, median of {timed['repeats']} "
              f"alternating rounds, {timed['threads']} threads: streamed (early_exit_stream), batch by batch (model.early_exit), "
              "time-predicted (each segment's measured time at the exit shares), FLOPs-predicted:\n")
        print("| budget MFLOPs | accuracy | avg MFLOPs | streamed | batch by batch | time-predicted | FLOPs-predicted | leaving at exit "
              + " / ".join(str(k + 1) for k in range(n_exits)) + " |")
        print("|---|---|---|---|---|---|---|---|")
        for row in timed["budgets"]:
            print(f"| {row['budget'] / 1e6:.2f} | {100 * row['accuracy']:.2f} | {row['flops'] / 1e6:.2f} | "
                  + " | ".join(f"{row[k]:.2f}x" for k in ("measured", "measured_per_batch", "time_predicted", "flops_predicted"))
                  + " | " + " / ".join(f"{v:.0%}" for v in row["exit_shares"]) + " |")
    mine = claims(results, n_exits)
    print("\nThe papers' claims, checked here (paired over seeds: same initial weights and batches):\n")
    if beside is None:
        print("| paper | claim | here | numbers (points of accuracy, mean ± 95 % interval) |")
        print("|---|---|---|---|")
        for paper, claim, seen, numbers in mine:
            print(f"| {paper} | {claim} | {seen} | {numbers} |")
    else:
        theirs = {(paper, claim): seen for paper, claim, seen, _ in claims(beside, len(beside["meta"]["flops"]))}
        other = beside["meta"].get("data", "corrupted digits")
        print(f"| paper | claim | {other} | {data} | same verdict | numbers here (points of accuracy, mean ± 95 % interval) |")
        print("|---|---|---|---|---|---|")
        for paper, claim, seen, numbers in mine:
            there = theirs.get((paper, claim), "not run")
            same = "yes" if there == seen else ("–" if "not run" in there or "fewer" in there or "fewer" in seen else "no")
            print(f"| {paper} | {claim} | {there} | {seen} | {same} | {numbers} |")
    if figure:
        draw(results, figure)
        print(f"\nFigure: {figure}")


def claims(results, n_exits: int) -> list[tuple[str, str, str, str]]:
    """(paper, claim, verdict, the numbers behind it) for each seed paper's claim the results can test."""
    last = n_exits - 1
    claims = []

    def every_exit(a, b):
        parts = [paired(results, a, b, "test", k) for k in range(n_exits)]
        return parts, " / ".join(diff(p) for p in parts)

    if runs(results, "eed"):
        parts, text = every_exit("eed", "ce")
        claims.append(("EED (Lee et al.)", "the exits' ensemble as teacher improves every exit over per-exit CE, the final one too",
                       verdict(parts), f"eed − ce per exit: {text}"))
        first = range(min(2, results["meta"]["epochs"]))
        eed, ce = runs(results, "eed"), runs(results, "ce")
        conv = [[statistics.fmean(eed[s]["val_by_epoch"][e]) - statistics.fmean(ce[s]["val_by_epoch"][e])
                 for s in sorted(set(eed) & set(ce))] for e in first]
        claims.append(("EED", "converges faster: higher accuracy in the first epochs", verdict(conv),
                       "eed − ce, validation mean over exits, epoch 1 / 2: " + " / ".join(diff(c) for c in conv)))
    if runs(results, "distillation"):
        parts, text = every_exit("distillation", "ce")
        claims.append(("Phuong & Lampert", "distillation from the last exit improves the early exits over per-exit CE", verdict(parts[:-1]),
                       f"distillation − ce per exit: {text}"))
    if runs(results, "limited/distillation") and runs(results, "limited/ce"):
        both = common(results, "distillation", "ce", "limited/distillation", "limited/ce")
        full = [paired(results, "distillation", "ce", "test", k, both) for k in range(last)]
        few = [paired(results, "limited/distillation", "limited/ce", "test", k, both) for k in range(last)]
        gaps = [[f - g for f, g in zip(a, b)] for a, b in zip(few, full)]
        claims.append(("Phuong & Lampert", "the gains are largest with little labeled data", verdict(gaps),
                       "gain with 20 labels per class minus gain with all labels, early exits: " + " / ".join(diff(g) for g in gaps)))
    if runs(results, "limited/distillation+unlabeled"):
        parts = [paired(results, "limited/distillation+unlabeled", "limited/distillation", "test", k) for k in range(n_exits)]
        claims.append(("Phuong & Lampert", "unlabeled data helps (distillation on it, no labels)", verdict(parts),
                       "with − without the unlabeled images (the same labeled batches, unlabeled ones added), per exit: "
                       + " / ".join(diff(p) for p in parts)))
    if runs(results, "byot"):
        parts, text = every_exit("byot", "ce")
        claims.append(("BYOT (Zhang et al.)", "self-distillation from the deepest exit improves every exit, the final one too",
                       verdict(parts), f"byot − ce per exit: {text}"))
    if runs(results, "msd"):
        parts, text = every_exit("msd", "byot")
        claims.append(("MSD (Luan et al.)", "distilling from every deeper exit beats BYOT at every exit", verdict(parts),
                       f"msd − byot per exit: {text}"))
    if runs(results, "mate"):
        gains = [paired(results, "mate", "ce", "test", k) for k in range(n_exits)]
        shallow_most = [[a - b for a, b in zip(gains[0], gains[last])]]
        claims.append(("MATE (Sun et al.)", "appropriate teachers improve every exit over per-exit CE", verdict(gains),
                       "mate − ce per exit: " + " / ".join(diff(g) for g in gains)))
        claims.append(("MATE", "the shallow exits gain most", verdict(shallow_most),
                       "exit 1's gain over ce − the final exit's: " + diff(shallow_most[0])))
    if runs(results, "ekd"):
        parts, text = every_exit("ekd", "ce")
        claims.append(("EKD", "distilling from an external teacher improves every exit", verdict(parts), f"ekd − ce per exit: {text}"))
    if runs(results, "sdn"):
        parts, text = every_exit("sdn", "ce")
        claims.append(("SDN weighting (Kaya et al.)", "weighting the exits by depth, ramped up, improves the early exits",
                       verdict(parts[:-1]), f"sdn − ce per exit: {text}"))
    if runs(results, "ce") and runs(results, "baseline"):
        ce, alone = runs(results, "ce"), runs(results, "baseline")
        parts = [[ce[s]["test"][last] - alone[s]["test"][0] for s in sorted(set(ce) & set(alone))]]
        claims.append(("deep supervision (BYOT, DSN)", "training with exits improves the final classifier over the backbone trained alone",
                       verdict(parts), "ce's final exit − the backbone alone: " + diff(parts[0])))
    return claims


def draw(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in LOSSES:
        if runs(results, name):
            curves = [r["curve"] for r in runs(results, name).values()]
            flops = [statistics.fmean(v) / 1e6 for v in zip(*[r["curve_flops"] for r in runs(results, name).values()])]
            ax.plot(flops, [100 * statistics.fmean(v) for v in zip(*curves)], "-", lw=1.4, label=name)
    base = column(results, "baseline", "test", 0)
    ax.errorbar([meta["backbone_flops"] / 1e6], [100 * statistics.fmean(base)], yerr=[interval([100 * v for v in base])[1]],
                fmt="kD", ms=7, capsize=3, label=f"{MODEL} alone (CE)")
    for k in range(len(meta["flops"]) - 1):
        key = f"smaller@exit{k + 1}"
        if runs(results, key):
            acc = column(results, key, "test", 0)
            flops = next(iter(runs(results, key).values()))["flops"] / 1e6
            ax.errorbar([flops], [100 * statistics.fmean(acc)], yerr=[interval([100 * v for v in acc])[1]], fmt="k^", mfc="white", ms=7,
                        capsize=3, label=f"narrower {MODEL} alone (CE)" if k == 0 else None)
    ax.set_xlabel("average MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{meta.get('data', 'corrupted digits')}: budgeted early exit per loss, mean over {SEEDS_SHOWN[0]} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- train-step time -------------------------------------------------------------------------------


def step_study(repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds of a full train step and of the loss call alone, per loss."""
    model = multi_exit(0)
    task = corrupted_digits(seed=0, variants=1)
    x, y = task.train.x[:BATCH], task.train.y[:BATCH]
    teacher_logits = torch.randn(BATCH, 10)
    losses = {name: timm_exits.create_loss(name, num_exits=model.num_exits, epochs=EPOCHS) for name in LOSSES}
    params = list(model.parameters()) + [p for fn in losses.values() for p in fn.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-6)

    def call(name, outputs):
        return losses[name](outputs, y, teacher_logits) if name == "ekd" else losses[name](outputs, y)

    def step(name):
        loss = call(name, model(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    with torch.no_grad():
        z0 = [t.detach() for t in model(x)]
    steps = {name: [] for name in LOSSES}
    calls = {name: [] for name in LOSSES}
    for name in LOSSES:  # warm-up
        step(name)
    order = list(LOSSES)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # no loss always runs first or last in a round
        for name in order:
            t = time.perf_counter()
            step(name)
            steps[name].append(time.perf_counter() - t)
            z = [zi.clone().requires_grad_() for zi in z0]
            t = time.perf_counter()
            torch.autograd.grad(call(name, z), z)
            calls[name].append(time.perf_counter() - t)
    return {name: (statistics.median(steps[name]), statistics.median(calls[name])) for name in LOSSES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"],
                        help="the corrupted digits (default) or Fashion-MNIST read from disk (timm_exits.data.fashion_mnist)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST's folder (default: Debian's /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--train-size", type=int, default=None, help=f"Fashion-MNIST training images (default {FASHION_TRAIN})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-4 on the digits, 0-2 on Fashion-MNIST")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: {EPOCHS} on the digits, {FASHION_EPOCHS} on Fashion-MNIST")
    parser.add_argument("--results", default=None, help="default: benchmarks/results/loss_study.json (loss_study_fashion_mnist.json)")
    parser.add_argument("--figure", default=None, help="default: docs/figures/loss_study.png (loss_study_fashion_mnist.png)")
    parser.add_argument("--report", action="store_true", help="only print the report of the results file")
    parser.add_argument("--steps-only", action="store_true", help="only time the train steps")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--variants", type=int, default=6, help="corrupted variants per scan (fewer: a quick trial of the script)")
    args = parser.parse_args()
    digits = args.data == "digits"
    suffix = "" if digits else "_fashion_mnist"
    seeds = args.seeds or ([0, 1, 2, 3, 4] if digits else [0, 1, 2])
    epochs = args.epochs or (EPOCHS if digits else FASHION_EPOCHS)
    results = args.results or str(ROOT / f"benchmarks/results/loss_study{suffix}.json")
    figure = args.figure or str(ROOT / f"docs/figures/loss_study{suffix}.png")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  progress on stderr, the tables on stdout
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, timm {timm.__version__}.\n")
    if args.steps_only:
        timing = step_study(args.repeats)
        base_step, base_call = timing["ce"]
        print(f"Command: `python benchmarks/loss_study.py --steps-only --repeats {args.repeats}`\n")
        print(f"Train step (batch {BATCH}, 1x32x32, {MODEL}), median of {args.repeats} round-robin repeats:\n")
        print("| loss | step (ms) | step / CE step | loss call (ms) | loss call extra over CE, share of a CE step |")
        print("|---|---|---|---|---|")
        for name in LOSSES:
            step_s, call_s = timing[name]
            print(f"| {name} | {step_s * 1e3:.1f} | {step_s / base_step:.4f} | {call_s * 1e3:.3f} "
                  f"| {(call_s - base_call) / base_step * 100:+.2f} % |")
        return
    if not args.report:
        os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
        start = time.perf_counter()
        run_study(seeds, epochs, results, log, args.variants, args.data, args.train_size, args.data_root)
        log(f"study done in {(time.perf_counter() - start) / 60:.1f} min")
    os.makedirs(os.path.dirname(figure) or ".", exist_ok=True)
    beside = None if digits or not DIGITS_RESULTS.exists() else json.loads(DIGITS_RESULTS.read_text())
    report(json.loads(Path(results).read_text()), figure, beside)


if __name__ == "__main__":
    main()
