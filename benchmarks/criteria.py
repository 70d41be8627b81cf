"""Exit criteria at equal budgets, Zero Time Waste trained as its authors train it, and each exit's calibration.

Trains the demo's model (resnet18, exits after layer1..layer3, exit-ensemble distillation,
8 epochs, seed s) on the corrupted digits, caches every exit's logits on the training,
validation and test splits, and for each criterion calibrates thresholds on validation for
35, 50 and 75 % of the full model's FLOPs (exit 1 alone costs 29 %: a budget of 25 % cannot be
met), then reports test accuracy: max-prob, entropy, margin, patience (PBEE), max-prob after
per-exit temperature scaling, the anytime ensemble, and Zero Time Waste's geometric ensemble
(fitted on the training split's logits, as the authors fit it).

Zero Time Waste as a method follows the authors' pipeline (gmum/Zero-Time-Waste,
``ztw_cv_original``: ``train_networks.py`` with ``-t sdn_ic --stacking --detach_prev``, then
``running_ensb``): the plain backbone trained with cross entropy, then frozen (its batch norm
too), then its exit heads (theirs: a 3x3 conv, ReLU, SDN's mixed pooling, linear) trained alone
with the sum of their cross entropies (Adam, lr 1e-3, weight decay 1e-4, lr x0.1 after 30 % of
the epochs: their 15 of 50), once with plain heads (the SDN "IC-only" baseline they compare with)
and once cascaded; then the geometric ensemble.
Also each exit's NLL and expected calibration error before and after temperature scaling
(fitted on validation, measured on test), and each model's per-exit test accuracy.

    python benchmarks/criteria.py [--seeds 0 1 2] [--epochs 8] [--variants 6]
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings

import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_exits
from common import batches, cpu_name, interval
from timm_exits.data import corrupted_digits
from timm_exits.demo import fit
from timm_exits.heads import SDNHead

SHARES = (0.35, 0.5, 0.75)  # of the full model's FLOPs


def criteria(train, val, test) -> dict[str, dict]:
    """name -> keyword arguments of calibrate_thresholds / evaluate_thresholds."""
    temperature = timm_exits.calibrate_temperature(val)
    geometric = timm_exits.fit_geometric_ensemble(train)
    return {
        "max-prob": {},
        "entropy": {"criterion": "entropy"},
        "margin": {"criterion": "margin"},
        "patience (PBEE)": {"criterion": "patience"},
        "max-prob, temperature-scaled": {"temperature": temperature},
        "anytime ensemble (mean)": {"ensemble": True},
        "ZTW geometric ensemble (of EED's exits)": {"ensemble": geometric},
    }


def equal_budgets(val, test, kwargs: dict) -> list[float]:
    """Test accuracy at each share of the full cost, thresholds calibrated on validation."""
    accs = []
    for share in SHARES:
        calibration = timm_exits.calibrate_thresholds(val, share * val.flops[-1], **kwargs)
        accs.append(timm_exits.evaluate_thresholds(test, calibration.thresholds, **kwargs).accuracy)
    return accs


class ZTWHead(SDNHead):
    """The authors' internal classifier at these feature sizes (``--head_arch conv sdn_pool``): a 3x3 conv keeping the
    width, ReLU, SDN's mixed pooling, linear."""

    def __init__(self, channels: int, num_classes: int, layout):
        super().__init__(channels, num_classes, layout)
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=True), nn.ReLU())

    def features(self, x):
        return super().features(self.conv(x))


def train_heads(model, x, y, epochs: int, batch_size: int = 64) -> None:
    """ZTW's IC-only training: the backbone frozen (batch norm in eval mode), the heads trained on the sum of their cross entropies."""
    model.backbone.requires_grad_(False)
    optimizer = torch.optim.Adam(model.exits.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [max(1, round(0.3 * epochs))], 0.1)
    for _ in range(epochs):
        model.train()
        model.backbone.eval()
        for idx in torch.randperm(len(x)).split(batch_size):
            loss = sum(F.cross_entropy(z, y[idx]) for z in model(x[idx])[:-1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()


def exit_accuracies(cached) -> list[float]:
    return [point.accuracy for point in timm_exits.anytime_accuracy(cached)]


def run(seed: int, epochs: int, variants: int, log) -> tuple[dict, list, dict]:
    task = corrupted_digits(seed=0, variants=variants)
    torch.manual_seed(seed)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32))
    torch.manual_seed(seed)
    fit(model, timm_exits.create_loss("eed", num_exits=4, epochs=epochs), *task.train.tensors(), epochs)
    train, val, test = (timm_exits.collect_exit_logits(model, batches(s), progress=False) for s in (task.train, task.val, task.test))
    rows, accuracies = {}, {"EED (the demo's model)": exit_accuracies(test)}
    for name, kwargs in criteria(train, val, test).items():
        rows[name] = equal_budgets(val, test, kwargs)
        log(f"seed {seed} {name:<45} " + " ".join(f"{a:.4f}" for a in rows[name]))
    fit_t = timm_exits.calibrate_temperature(val)
    calibration_rows = []
    for k, (z, t) in enumerate(zip(test.logits, fit_t.temperatures)):
        calibration_rows.append({
            "exit": k + 1,
            "temperature": t,
            "nll": (F.cross_entropy(z, test.labels).item(), F.cross_entropy(z / t, test.labels).item()),
            "ece": (timm_exits.expected_calibration_error(z, test.labels), timm_exits.expected_calibration_error(z / t, test.labels)),
        })

    torch.manual_seed(seed)
    backbone = timm.create_model("resnet18", num_classes=10, in_chans=1)
    fit(backbone, F.cross_entropy, *task.train.tensors(), epochs)
    for cascade, name in ((False, "plain heads on the frozen CE backbone (SDN IC-only)"),
                          (True, "ZTW: cascaded heads on the frozen CE backbone")):
        torch.manual_seed(seed)
        ztw = timm_exits.wrap(copy.deepcopy(backbone), stages=[1, 2, 3], head=ZTWHead, input_size=(1, 32, 32), cascade=cascade)
        train_heads(ztw, *task.train.tensors(), epochs)
        train, val, test = (timm_exits.collect_exit_logits(ztw, batches(s), progress=False) for s in (task.train, task.val, task.test))
        accuracies[name] = exit_accuracies(test)
        rows[name + ", max-prob"] = equal_budgets(val, test, {})
        if cascade:
            rows[name + " + geometric ensemble (the method)"] = equal_budgets(
                val, test, {"ensemble": timm_exits.fit_geometric_ensemble(train)})
        for key in [k for k in rows if k.startswith(name)]:
            log(f"seed {seed} {key:<45} " + " ".join(f"{a:.4f}" for a in rows[key]))
    return rows, calibration_rows, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--variants", type=int, default=6)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/criteria.py --seeds {' '.join(map(str, args.seeds))} "
          f"--epochs {args.epochs} --variants {args.variants}`\n")
    per_seed = [run(seed, args.epochs, args.variants, log) for seed in args.seeds]
    def cell(values) -> str:
        mean, half = interval(values)
        return f"{mean:.2f} ± {half:.2f}"

    print(f"Test accuracy (%) at equal budgets (thresholds calibrated on validation), mean ± 95 % interval over {len(args.seeds)} seeds:\n")
    print("| criterion | " + " | ".join(f"{s:.0%} of the full cost" for s in SHARES) + " |")
    print("|---|" + "---:|" * len(SHARES))
    for name in per_seed[0][0]:
        print(f"| {name} | " + " | ".join(cell([100 * rows[name][i] for rows, _, _ in per_seed]) for i in range(len(SHARES))) + " |")
    print("\nEach exit's test accuracy (%), every sample through every exit, mean ± 95 % interval:\n")
    print("| model | " + " | ".join(f"exit {k + 1}" for k in range(4)) + " |")
    print("|---|" + "---:|" * 4)
    for name in per_seed[0][2]:
        print(f"| {name} | " + " | ".join(cell([100 * acc[name][k] for _, _, acc in per_seed]) for k in range(4)) + " |")
    plain, ztw = list(per_seed[0][2])[1:]
    print("| cascade's gain (paired, points) | "
          + " | ".join(cell([100 * (acc[ztw][k] - acc[plain][k]) for _, _, acc in per_seed]) for k in range(4)) + " |")
    print("\nEach exit's calibration on test, temperature fitted on validation (first seed):\n")
    print("| exit | temperature | NLL before → after | ECE before → after |")
    print("|---|---|---|---|")
    for row in per_seed[0][1]:
        print(f"| {row['exit']} | {row['temperature']:.3f} "
              f"| {row['nll'][0]:.4f} → {row['nll'][1]:.4f} | {row['ece'][0]:.4f} → {row['ece'][1]:.4f} |")


if __name__ == "__main__":
    main()
