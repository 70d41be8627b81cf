"""Exit criteria at equal budgets, and each exit's calibration, on the demo's model and task.

Trains the demo's model (resnet18, exits after layer1..layer3, exit-ensemble distillation,
8 epochs, seed s) on the corrupted digits, caches every exit's logits on the training,
validation and test splits, and for each criterion calibrates thresholds on validation for 25,
50 and 75 % of the way from the first exit's cost to the full model's, then reports test
accuracy: max-prob, entropy, margin, patience (PBEE), max-prob after per-exit temperature
scaling, the anytime ensemble, and Zero Time Waste's geometric ensemble (fitted on the
training split's logits, as the authors fit it). Also each exit's NLL and expected calibration
error before and after temperature scaling (fitted on validation, measured on test).

    python benchmarks/criteria.py [--seeds 0 1 2] [--epochs 8] [--variants 6]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import timm
import torch
import torch.nn.functional as F
from overhead import cpu_name

import timm_exits
from timm_exits.data import corrupted_digits
from timm_exits.demo import fit

SHARES = (0.25, 0.5, 0.75)


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
        "ZTW geometric ensemble": {"ensemble": geometric},
    }


def run(seed: int, epochs: int, variants: int, log) -> tuple[dict, list]:
    task = corrupted_digits(seed=0, variants=variants)
    torch.manual_seed(seed)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32))
    torch.manual_seed(seed)
    fit(model, timm_exits.create_loss("eed", num_exits=4, epochs=epochs), *task.train.tensors(), epochs)
    batches = lambda s: [(s.x[i : i + 256], s.y[i : i + 256]) for i in range(0, len(s), 256)]  # noqa: E731
    train, val, test = (timm_exits.collect_exit_logits(model, batches(s), progress=False) for s in (task.train, task.val, task.test))
    first, full = val.flops[0], val.flops[-1]
    rows = {}
    for name, kwargs in criteria(train, val, test).items():
        accs = []
        for share in SHARES:
            calibration = timm_exits.calibrate_thresholds(val, first + share * (full - first), **kwargs)
            accs.append(timm_exits.evaluate_thresholds(test, calibration.thresholds, **kwargs).accuracy)
        rows[name] = accs
        log(f"seed {seed} {name:<30} " + " ".join(f"{a:.4f}" for a in accs))
    fit_t = timm_exits.calibrate_temperature(val)
    calibration_rows = []
    for k, (z, t) in enumerate(zip(test.logits, fit_t.temperatures)):
        calibration_rows.append({"exit": k + 1, "temperature": t, "nll": (F.cross_entropy(z, test.labels).item(), F.cross_entropy(z / t, test.labels).item()),
                                 "ece": (timm_exits.expected_calibration_error(z, test.labels), timm_exits.expected_calibration_error(z / t, test.labels))})
    return rows, calibration_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--variants", type=int, default=6)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/criteria.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs} --variants {args.variants}`\n")
    per_seed = [run(seed, args.epochs, args.variants, log) for seed in args.seeds]
    print("Test accuracy (%) at equal budgets (thresholds calibrated on validation), mean over seeds (min–max):\n")
    print("| criterion | " + " | ".join(f"{s:.0%} of the way to the full cost" for s in SHARES) + " |")
    print("|---|" + "---|" * len(SHARES))
    for name in per_seed[0][0]:
        cells = []
        for i in range(len(SHARES)):
            values = [100 * rows[name][i] for rows, _ in per_seed]
            cells.append(f"{statistics.fmean(values):.2f} ({min(values):.2f}–{max(values):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nEach exit's calibration on test, temperature fitted on validation (first seed):\n")
    print("| exit | temperature | NLL before → after | ECE before → after |")
    print("|---|---|---|---|")
    for row in per_seed[0][1]:
        print(f"| {row['exit']} | {row['temperature']:.3f} | {row['nll'][0]:.4f} → {row['nll'][1]:.4f} | {row['ece'][0]:.4f} → {row['ece'][1]:.4f} |")


if __name__ == "__main__":
    main()
