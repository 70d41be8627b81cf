"""Every loss on the same wrapped model and data: test accuracy per exit (3 seeds) and train-step time.

The demo's setting: timm resnet10t (1 input channel) with linear exits after layer1..layer3,
scikit-learn's digits at 32x32 (fixed 75/25 split), AdamW + one-cycle, 6 epochs, batch 64, CPU.
Each seed fixes the initial weights (the same for every loss) and the batch order. EKD's teacher
is the plain resnet10t trained with cross entropy on the same data for the same epochs.

Step time: one process, one model, a fixed batch of 64; a full train step (forward, loss,
backward, optimizer step) with each loss, round-robin so drift hits all alike, median of the
repeats, divided by the median with plain per-exit CE. The loss call alone (its forward and
backward on logits) is timed the same way; the order within a round is shuffled, which is what a loss can add to a step.

    python benchmarks/loss_study.py [--seeds 0 1 2] [--epochs 6] [--repeats 40]
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

import timm_exits
from timm_exits.demo import evaluate, fit, load_digits_32

LOSSES = ["ce", "sdn", "distillation", "eed", "byot", "msd", "mate", "ekd"]
MODEL, STAGES, EPOCHS, BATCH = "resnet10t", [1, 2, 3], 6, 64


def build(seed: int) -> timm_exits.MultiExitModel:
    torch.manual_seed(seed)
    backbone = timm.create_model(MODEL, pretrained=False, num_classes=10, in_chans=1)
    return timm_exits.wrap(backbone, stages=STAGES, input_size=(1, 32, 32))


def accuracy_study(seeds, epochs: int, log) -> dict[str, list[list[float]]]:
    x_train, y_train, x_test, y_test = load_digits_32(0)
    results: dict[str, list[list[float]]] = {name: [] for name in LOSSES}
    for seed in seeds:
        torch.manual_seed(seed)
        teacher = timm.create_model(MODEL, pretrained=False, num_classes=10, in_chans=1)
        fit(teacher, F.cross_entropy, x_train, y_train, epochs, BATCH)
        for name in LOSSES:
            start = time.perf_counter()
            model = build(seed)
            loss_fn = timm_exits.create_loss(name, num_exits=model.num_exits, epochs=epochs)
            torch.manual_seed(seed)  # the same batch order for every loss
            fit(model, loss_fn, x_train, y_train, epochs, BATCH, teacher=teacher if name == "ekd" else None)
            accs = evaluate(model, x_test, y_test)
            results[name].append(accs)
            log(f"seed {seed} {name:<13} " + " ".join(f"{a:.4f}" for a in accs) + f"  ({time.perf_counter() - start:.0f}s)")
    return results


def step_study(repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds of a full train step and of the loss call alone, per loss."""
    model = build(0)
    x_train, y_train, _, _ = load_digits_32(0)
    x, y = x_train[:BATCH], y_train[:BATCH]
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

    def loss_only(name, z):
        loss = call(name, z)
        torch.autograd.grad(loss, z)

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
            loss_only(name, z)
            calls[name].append(time.perf_counter() - t)
    return {name: (statistics.median(steps[name]), statistics.median(calls[name])) for name in LOSSES}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--skip-accuracy", action="store_true", help="only time the steps")
    args = parser.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  progress on stderr, the table on stdout

    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/loss_study.py --seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs} --repeats {args.repeats}`\n")
    if not args.skip_accuracy:
        results = accuracy_study(args.seeds, args.epochs, log)
        names = [f"exit {k} ({s})" for k, s in enumerate(build(0).stages + ["head"], start=1)]
        print(f"Test accuracy per exit, mean ± std over seeds {args.seeds} ({args.epochs} epochs each):\n")
        print("| loss | " + " | ".join(names) + " | mean over exits |")
        print("|---|" + "---|" * (len(names) + 1))
        for name in LOSSES:
            runs = torch.tensor(results[name])  # (seeds, exits)
            mean, std = runs.mean(0), runs.std(0) if len(runs) > 1 else torch.zeros(runs.shape[1])
            cells = [f"{m:.4f} ± {s:.4f}" for m, s in zip(mean.tolist(), std.tolist())]
            print(f"| {name} | " + " | ".join(cells) + f" | {runs.mean():.4f} |")
        print()
    timing = step_study(args.repeats)
    base_step, base_call = timing["ce"]
    print(f"Train step (batch {BATCH}, 1x32x32), median of {args.repeats} round-robin repeats:\n")
    print("| loss | step (ms) | step / CE step | loss call (ms) | loss call extra over CE, share of a CE step |")
    print("|---|---|---|---|---|")
    for name in LOSSES:
        step_s, call_s = timing[name]
        print(f"| {name} | {step_s * 1e3:.1f} | {step_s / base_step:.4f} | {call_s * 1e3:.3f} | {(call_s - base_call) / base_step * 100:+.2f} % |")


if __name__ == "__main__":
    main()
