"""Forward-time overhead of a wrapped model (all exits, linear heads) over the plain model.

For each model, the plain and the wrapped forward are timed alternately in one process (so drift
on a shared machine hits both alike) and the ratio of their medians is compared with what the
FLOPs predict: 1 + (heads' FLOPs / backbone FLOPs), from `timm_exits.flops_report`. Also times wrap().

    python benchmarks/overhead.py [--batch 32] [--size 224] [--repeats 7] [--breakdown]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import timm
import torch

import timm_exits
from timm_exits.profile import alternating_medians

CASES = {
    "resnet50, exits after layer1-3": ("resnet50", [1, 2, 3]),
    "vit_small_patch16_224, exits after blocks 3, 6, 9": ("vit_small_patch16_224", [3, 6, 9]),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def allocator() -> str:
    """The C allocator's settings that change CPU timings: glibc's MALLOC_* variables and an LD_PRELOAD-ed allocator (see benchmarks/allocator.py)."""
    import os

    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or (k == "LD_PRELOAD" and v)]
    return "allocator " + (" ".join(tuned) if tuned else "glibc defaults")


@torch.inference_mode()
def measure(name: str, stages, batch: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=1000).eval()
    start = time.perf_counter()
    wrapped = timm_exits.wrap(plain, stages=stages).eval()
    wrap_seconds = time.perf_counter() - start
    x = torch.randn(batch, 3, size, size)
    report = timm_exits.flops_report(wrapped, input_size=(3, size, size))
    backbone, heads = report.backbone_flops, report.all_exits_flops - report.backbone_flops
    plain(x), wrapped(x)  # warm-up
    times = {"plain": [], "wrapped": []}
    for _ in range(repeats):
        for label, model in (("plain", plain), ("wrapped", wrapped)):
            t = time.perf_counter()
            model(x)
            times[label].append(time.perf_counter() - t)
    plain_s, wrapped_s = statistics.median(times["plain"]), statistics.median(times["wrapped"])
    return {
        "wrap_s": wrap_seconds,
        "plain_s": plain_s,
        "wrapped_s": wrapped_s,
        "measured": wrapped_s / plain_s,
        "predicted": 1 + heads / backbone,
        "backbone_gflops": backbone / 1e9,
        "heads_mflops": heads / 1e6,
    }


@torch.inference_mode()
def breakdown(batch: int, size: int, repeats: int) -> dict:
    """Where resnet50's wrapper cost comes from: fx's code of the plain model, the cuts, the heads.

    One process, alternating rounds after a warm-up: the plain model, a whole-model fx trace of
    it, the wrapped model's segments without heads, and the wrapped model; medians over plain.
    """
    torch.manual_seed(0)
    plain = timm.create_model("resnet50").eval()
    model = timm_exits.wrap(plain, stages=[1, 2, 3]).eval()
    x = torch.randn(batch, 3, size, size)
    traced = torch.fx.symbolic_trace(plain)

    def segments_only():
        state = (x,)
        for step in model.steps()[:-1]:
            _, state = step.segment(*state)
        model.steps()[-1].segment(*state)

    runs = {"plain": lambda: plain(x), "fx whole graph": lambda: traced(x), "segments only": segments_only, "wrapped": lambda: model(x)}
    times = alternating_medians(runs, repeats)
    return {label: t / times["plain"] for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--breakdown", action="store_true", help="only resnet50's cost split: fx's code, the cuts, the heads")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.breakdown:
        print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads; resnet50, batch {args.batch} at {args.size}, median of {args.repeats} rounds, over plain")
        for label, ratio in breakdown(args.batch, args.size, args.repeats).items():
            print(f"| {label} | {ratio:.3f} |")
        return
    rows = {label: measure(name, stages, args.batch, args.size, args.repeats) for label, (name, stages) in CASES.items()}
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(f"batch {args.batch} at {args.size}x{args.size}, eval, inference_mode, median of {args.repeats} alternating runs")
    header = "| model | backbone GFLOPs/img | heads MFLOPs/img | plain s | wrapped s | measured ratio | FLOPs-predicted ratio | excess | wrap() s |"
    print(header)
    print("|---" * 9 + "|")
    for label, r in rows.items():
        excess = (r["measured"] / r["predicted"] - 1) * 100
        print(f"| {label} | {r['backbone_gflops']:.2f} | {r['heads_mflops']:.3f} | {r['plain_s']:.3f} | {r['wrapped_s']:.3f} | {r['measured']:.4f} | {r['predicted']:.4f} | {excess:+.1f} % | {r['wrap_s']:.2f} |")


if __name__ == "__main__":
    main()
