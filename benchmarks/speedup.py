"""Is the speedup real? Early exit on the corrupted digits: latency at batch 1, throughput at batch 64, three ways.

Trains the demo's model (resnet18, exits after layer1..layer3, exit-ensemble distillation,
8 epochs, seed 0) on the corrupted digits, calibrates thresholds on the validation split at five
budgets (evenly spaced from the first exit's FLOPs to the whole model's) and, on the test split:

- latency at batch 1: every test image alone, p50 and p95 over the images, for the plain
  backbone and for `early_exit` at each budget;
- throughput at batch 64: the test split in batches of 64, images per second, median of
  `--repeats` alternating rounds;
- each speedup three ways: measured (plain over early exit: mean latency at batch 1, throughput
  at batch 64), time-predicted (`profile_exits` at that batch size: each segment's and head's
  measured time weighted by where the images left) and FLOPs-predicted (the backbone's FLOPs over
  the images' average), each from the images that were timed.

    python benchmarks/speedup.py [--epochs 8] [--repeats 5] [--images 500]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch

import timm_exits
from common import batches, cpu_name
from timm_exits.calibration import calibrate_thresholds, collect_exit_logits
from timm_exits.cost.profile import alternating_medians
from timm_exits.data import corrupted_digits
from timm_exits.demo import fit


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@torch.no_grad()
def latencies(fn, images: torch.Tensor) -> list[float]:
    """Seconds of `fn` on each image alone (after one warm-up call)."""
    fn(images[:1])
    out = []
    for i in range(len(images)):
        t = time.perf_counter()
        fn(images[i : i + 1])
        out.append(time.perf_counter() - t)
    return out


@torch.no_grad()
def throughput(runs: dict, images: torch.Tensor, batch: int, repeats: int) -> dict:
    """Images per second of each callable over `images` in batches, median of alternating rounds after a warm-up round."""
    passes = {label: (lambda fn=fn: [fn(images[i : i + batch]) for i in range(0, len(images), batch)]) for label, fn in runs.items()}
    return {label: len(images) / t for label, t in alternating_medians(passes, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=500, help="test images timed one by one at batch 1")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    task = corrupted_digits(seed=0)
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32))
    torch.manual_seed(0)  # the batch order, as the demo's
    fit(model, timm_exits.create_loss("eed", num_exits=4, epochs=args.epochs), *task.train.tensors(), args.epochs)
    model.eval()
    val = collect_exit_logits(model, batches(task.val))
    backbone = timm_exits.flops_report(model).backbone_flops
    first, full = val.flops[0], val.flops[-1]
    budgets = [first + (full - first) * i / 4 for i in range(5)]
    points = [calibrate_thresholds(val, b) for b in budgets]
    x = task.test.x
    profiles = {b: timm_exits.profile_exits(model, x[:b], repeats=20) for b in (1, 64)}

    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/speedup.py --epochs {args.epochs} --repeats {args.repeats} --images {args.images}`\n")
    plain = model.backbone
    lat_plain = latencies(plain, x[: args.images])
    runs = {"plain": plain}
    rows = []
    for i, c in enumerate(points):
        run = lambda b, t=c.thresholds: model.early_exit(b, threshold=t)  # noqa: E731
        runs[i] = run
        lat = latencies(run, x[: args.images])
        result, first_n = model.early_exit(x, threshold=c.thresholds), model.early_exit(x[: args.images], threshold=c.thresholds)
        accuracy = float((result.logits.argmax(1) == task.test.y).double().mean())
        rows.append({"budget": budgets[i], "accuracy": accuracy, "latency": lat,
                     "shares": [n / len(x) for n in result.exit_counts(model.num_exits)], "flops": float(result.flops.double().mean()),
                     "shares_1": [n / args.images for n in first_n.exit_counts(model.num_exits)],
                     "flops_1": float(first_n.flops.double().mean())})
    rates = throughput(runs, x, 64, args.repeats)
    p50_plain, p95_plain = percentile(lat_plain, 0.5), percentile(lat_plain, 0.95)
    print(f"Test split: {len(x)} images; batch 1 over the first {args.images}. "
          f"Plain resnet18: p50 {p50_plain * 1e3:.2f} ms, p95 {p95_plain * 1e3:.2f} ms at batch 1; "
          f"{rates['plain']:.0f} images/s at batch 64.\n")
    print("| budget (MFLOPs) | test accuracy | images leaving at exit 1/2/3/4 | batch 1: p50 / p95 (ms) "
          "| batch 1 speedup: measured (mean latency) / time-pred. / FLOPs-pred. "
          "| batch 64: images/s | batch 64 speedup: measured / time-pred. / FLOPs-pred. |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        p50, p95 = percentile(r["latency"], 0.5), percentile(r["latency"], 0.95)
        mean_speedup = statistics.fmean(lat_plain) / statistics.fmean(r["latency"])
        b1 = f"{mean_speedup:.2f}x / {profiles[1].predicted_speedup(r['shares_1']):.2f}x / {backbone / r['flops_1']:.2f}x"
        b64 = f"{rates[i] / rates['plain']:.2f}x / {profiles[64].predicted_speedup(r['shares']):.2f}x / {backbone / r['flops']:.2f}x"
        print(f"| {r['budget'] / 1e6:.1f} | {100 * r['accuracy']:.2f} % | " + " / ".join(f"{s:.0%}" for s in r["shares"])
              + f" | {p50 * 1e3:.2f} / {p95 * 1e3:.2f} | {b1} | {rates[i]:.0f} | {b64} |")
    for b, p in profiles.items():
        time_shares = [t / sum(p.segment_seconds) for t in p.segment_seconds]
        heads = sum(p.head_seconds) / p.plain_seconds
        print(f"\nAt batch {b}: segments' share of the time " + " / ".join(f"{v:.0%}" for v in time_shares)
              + f"; the three early heads together {heads:.1%} of the plain model's time.")
    reached = [e.backbone_flops for e in timm_exits.flops_report(model).exits]
    print("\nSegments' share of the FLOPs: " + " / ".join(f"{(b - a) / backbone:.0%}" for a, b in zip([0] + reached, reached)))


if __name__ == "__main__":
    main()
