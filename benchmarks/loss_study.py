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
from timm_exits.data import corrupted_digits
from timm_exits.demo import evaluate, fit, narrower
from timm_exits.runtime import exit_costs

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ["ce", "sdn", "distillation", "eed", "byot", "msd", "mate", "ekd"]
LIMITED = ["limited/baseline", "limited/ce", "limited/distillation", "limited/distillation+unlabeled"]
MODEL, STAGES, EPOCHS, BATCH, SIZE = "resnet18", [1, 2, 3], 8, 64, (1, 32, 32)
BUDGETS = 20


def plain(seed: int, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False, num_classes=10, in_chans=1, **kwargs)


def multi_exit(seed: int) -> timm_exits.MultiExitModel:
    return timm_exits.wrap(plain(seed), stages=STAGES, input_size=SIZE)


def repeated(x: torch.Tensor, y: torch.Tensor, length: int):
    """`x`, `y` tiled to `length` rows: a small labeled set trained for as many steps as the full one."""
    idx = torch.arange(length) % len(x)
    return x[idx], y[idx]


def record(model, task, epochs_val: list, budgets: list[float], seconds: float) -> dict:
    accs = evaluate(model, task.test.x, task.test.y)
    out = {"test": accs, "val_by_epoch": epochs_val, "seconds": seconds}
    if isinstance(model, timm_exits.MultiExitModel):
        val, test = collect_exit_logits(model, batches(task.val)), collect_exit_logits(model, batches(task.test))
        out["anytime_ensemble"] = [float(v) for v in ((test.predictions(True) == test.labels).double().mean(1)).tolist()]
        curve = budgeted_curve(val, budgets, evaluate_on=test)
        out["curve"], out["curve_flops"] = [p.accuracy for p in curve], [p.flops for p in curve]
    return out


def train(model, loss_fn, x, y, task, epochs: int, seed: int, teacher=None, batch: int = BATCH) -> tuple[list, float]:
    val_by_epoch = []
    start = time.perf_counter()
    torch.manual_seed(seed)  # the same batch order for every run of a seed
    fit(model, loss_fn, x, y, epochs, batch, teacher=teacher,
        on_epoch=lambda epoch, loss: val_by_epoch.append(evaluate(model, task.val.x, task.val.y)))
    return val_by_epoch, time.perf_counter() - start


def run_study(seeds, epochs: int, path: str, log, variants: int = 6) -> dict:
    results = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
    task = corrupted_digits(seed=0, variants=variants)
    x, y = task.train.tensors()
    x_lab, y_lab = repeated(*task.limited(unlabeled=False).tensors(), len(x))
    unlabeled = task.train.subset(~task.labeled)
    # the semi-supervised run sees the same labeled stream plus the unlabeled images: batches twice
    # as large, about as many steps
    x_semi, y_semi = torch.cat([x_lab, unlabeled.x]), torch.cat([y_lab, torch.full_like(unlabeled.y, -100)])
    costs = exit_costs(multi_exit(0), SIZE)  # backbone to exit k plus heads 0..k, as early exit spends
    budgets = [costs[0] + (costs[-1] - costs[0]) * i / (BUDGETS - 1) for i in range(BUDGETS)]
    settings = {"model": MODEL, "stages": STAGES, "epochs": epochs, "batch": BATCH, "variants": variants}
    if "meta" in results and results["meta"]["settings"] != settings:
        raise SystemExit(f"{path} holds a study with {results['meta']['settings']}, not {settings}: "
                         "give another --results to start a new one")
    backbone = timm_exits.flops_report(multi_exit(0)).backbone_flops
    results["meta"] = {"settings": settings, "epochs": epochs, "batch": BATCH, "stages": STAGES, "flops": costs, "backbone_flops": backbone,
                       "budgets": budgets, "train": len(task.train), "val": len(task.val), "test": len(task.test),
                       "labeled": int(task.labeled.sum())}

    def save(key, seed, value):
        results.setdefault(key, {})[str(seed)] = value
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
        log(f"seed {seed} {key:<32} test " + " ".join(f"{a:.4f}" for a in value["test"]) + f"  ({value['seconds']:.0f}s)")

    def pending(key, seed):
        return str(seed) not in results.get(key, {})

    for seed in seeds:
        teacher = None
        if pending("baseline", seed) or pending("ekd", seed):
            teacher = plain(seed)
            curve, seconds = train(teacher, F.cross_entropy, x, y, task, epochs, seed)
            save("baseline", seed, record(teacher, task, curve, budgets, seconds))
        for name in LOSSES:
            if pending(name, seed):
                model = multi_exit(seed)
                loss_fn = timm_exits.create_loss(name, num_exits=model.num_exits, epochs=epochs)
                curve, seconds = train(model, loss_fn, x, y, task, epochs, seed, teacher=teacher if name == "ekd" else None)
                save(name, seed, record(model, task, curve, budgets, seconds))
        for k, cost in enumerate(costs[:-1], start=1):
            key = f"smaller@exit{k}"
            if pending(key, seed):
                torch.manual_seed(seed)
                model, channels = narrower(MODEL, cost, SIZE, num_classes=10, in_chans=1)
                curve, seconds = train(model, F.cross_entropy, x, y, task, epochs, seed)
                value = record(model, task, curve, budgets, seconds)
                value.update(channels=list(channels), flops=timm_exits.flops_report(model, input_size=SIZE).backbone_flops)
                save(key, seed, value)
        for key in LIMITED:
            if pending(key, seed):
                if key == "limited/baseline":
                    model, loss_fn, data = plain(seed), F.cross_entropy, (x_lab, y_lab)
                else:
                    model = multi_exit(seed)
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


def report(results: dict, figure: str | None) -> None:
    meta = results["meta"]
    n_exits = len(meta["flops"])
    seeds = sorted(runs(results, "ce"), key=int)
    SEEDS_SHOWN[0] = len(seeds)
    print(f"Corrupted digits: {meta['train']} train / {meta['val']} validation / {meta['test']} test images; "
          f"{MODEL}, exits after stages {meta['stages']}, {meta['epochs']} epochs, batch {meta['batch']}; seeds {', '.join(seeds)}. "
          "Mean ± half-width of the 95 % t interval over seeds, in %.\n")
    names = [f"exit {k + 1} ({f / 1e6:.1f} MFLOPs)" for k, f in enumerate(meta["flops"])]
    print("Test accuracy per exit:\n")
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * n_exits)
    for name in LOSSES:
        if runs(results, name):
            print(f"| {name} | " + " | ".join(fmt(column(results, name, "test", k)) for k in range(n_exits)) + " |")
    for name in LOSSES:
        if runs(results, name):
            print(f"| {name}, anytime ensemble | "
                  + " | ".join(fmt(column(results, name, "anytime_ensemble", k)) for k in range(n_exits)) + " |")
    print(f"| baseline: {MODEL} alone, CE | " + " | " * (n_exits - 1) + fmt(column(results, "baseline", "test", 0)) + " |")
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
    print_claims(results, n_exits)
    if figure:
        draw(results, figure)
        print(f"\nFigure: {figure}")


def print_claims(results, n_exits: int) -> None:
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
    print("\nThe papers' claims, checked here (paired over seeds: same initial weights and batches):\n")
    print("| paper | claim | here | numbers (points of accuracy, mean ± 95 % interval) |")
    print("|---|---|---|---|")
    for paper, claim, seen, numbers in claims:
        print(f"| {paper} | {claim} | {seen} | {numbers} |")


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
                        capsize=3, label="narrower resnet18 alone (CE)" if k == 0 else None)
    ax.set_xlabel("average MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"corrupted digits: budgeted early exit per loss, mean over {SEEDS_SHOWN[0]} seeds")
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/loss_study.json"))
    parser.add_argument("--figure", default=str(ROOT / "docs/figures/loss_study.png"))
    parser.add_argument("--report", action="store_true", help="only print the report of the results file")
    parser.add_argument("--steps-only", action="store_true", help="only time the train steps")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--variants", type=int, default=6, help="corrupted variants per scan (fewer: a quick trial of the script)")
    args = parser.parse_args()
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
        os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
        start = time.perf_counter()
        run_study(args.seeds, args.epochs, args.results, log, args.variants)
        log(f"study done in {(time.perf_counter() - start) / 60:.1f} min")
    os.makedirs(os.path.dirname(args.figure) or ".", exist_ok=True)
    report(json.loads(Path(args.results).read_text()), args.figure)


if __name__ == "__main__":
    main()
