"""Forward-time overhead of a wrapped model (all exits, linear heads) over the plain model.

For each model, the plain and the wrapped forward are timed alternately in one process (so drift
on a shared machine hits both alike) and the ratio of their medians is compared with what the
FLOPs predict: 1 + (heads' FLOPs / backbone FLOPs), from `timm_exits.flops_report`. Also times wrap().

    python benchmarks/overhead.py [--batch 32] [--size 224] [--repeats 7] [--breakdown]

``--last-exit`` measures instead what early exit costs when no sample leaves early, on the demo's
model (timm resnet18, 1x32x32 inputs, 10 classes, linear exits after layer1..3, batch 64):
``model.early_exit(x, threshold=inf)`` over ``model.backbone(x)``, the ratio taken in each of
`--repeats` alternating rounds (after a warm-up round) and its median given with the lowest and
highest round. The goal is the heads' FLOPs share + 3 %. Beside it, in the same rounds, the
parts it is made of: the fx segments alone, then the segments and heads called as the time
prediction counts them (`profile_exits`), so that the rows' differences say where the time goes:
fx's code of the backbone, the heads, and early exit's own per-step work::

    python benchmarks/overhead.py --last-exit [--repeats 40] [--threads 2] [--clock wall|cpu]

``--clock cpu`` reads the process's CPU time instead of the wall clock: on a shared machine it
leaves out the time the process waited for a core (with one thread it is the steadier reading;
with more, threads that spin waiting for each other count).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch

import timm_exits
from common import allocator, cpu_name
from timm_exits.cost.profile import alternating_medians

CASES = {
    "resnet50, exits after layer1-3": ("resnet50", [1, 2, 3]),
    "vit_small_patch16_224, exits after blocks 3, 6, 9": ("vit_small_patch16_224", [3, 6, 9]),
}


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


def heads_share(model, input_size) -> float:
    """The exit heads' FLOPs over the backbone's (`flops_report`)."""
    report = timm_exits.flops_report(model, input_size=input_size)
    return (report.all_exits_flops - report.backbone_flops) / report.backbone_flops


@torch.no_grad()
def last_exit(rounds: int, clock: str) -> tuple[dict, float]:
    """Each part's seconds over the plain backbone's, round by round, on the demo's model with every sample at the last exit."""
    import math

    size, batch = (1, 32, 32), 64
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=size).eval()
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(1))
    steps = model.steps()

    def segments():
        carried = (x,)
        for step in steps:
            _, carried = step.segment(*carried)

    def segments_and_heads():  # what profile_exits times, part by part, and the time prediction adds up
        carried = (x,)
        for step in steps:
            read, previous = step.split(carried)
            out, carried = step.segment(*read)
            if step.head is not None:
                carried = step.onward(carried, step.logits(out, previous))

    runs = {
        "plain backbone": lambda: model.backbone(x),
        "fx segments alone": segments,
        "segments + heads": segments_and_heads,
        "early exit, every sample to the last exit": lambda: model.early_exit(x, threshold=math.inf),
    }
    read = time.process_time if clock == "cpu" else time.perf_counter
    times: dict = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # alternating rounds, the first a warm-up (profile.alternating_times, with a choice of clock)
        for name, fn in runs.items():
            start = read()
            fn()
            if round_:
                times[name].append(read() - start)
    plain = times["plain backbone"]
    ratios = {name: sorted(t / p for t, p in zip(seconds, plain)) for name, seconds in times.items()}
    ratios["plain backbone"] = sorted(plain)  # its own row: seconds, not a ratio
    return ratios, heads_share(model, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--breakdown", action="store_true", help="only resnet50's cost split: fx's code, the cuts, the heads")
    parser.add_argument("--last-exit", action="store_true",
                        help="early exit with every sample at the last exit over the plain model, on the demo's model")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall clock, or the process's CPU time")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.last_exit:
        ratios, share = last_exit(args.repeats, args.clock)
        threads = f" --threads {args.threads}" if args.threads else ""
        print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, {allocator()}; "
              f"torch {torch.__version__}, timm {timm.__version__}")
        print(f"command: `python benchmarks/overhead.py --last-exit --repeats {args.repeats}{threads} --clock {args.clock}`")
        print(f"demo's model (resnet18, 1x32x32, exits after layer1-3), batch 64; {args.clock} time, "
              f"{args.repeats} alternating rounds after a warm-up")
        print(f"heads' FLOPs share {share:.2%}: goal for early exit at the last exit over plain <= {1 + share + 0.03:.4f}\n")
        print("| run | over the plain backbone, median of the rounds (lowest-highest) |")
        print("|---|---|")
        for name, each in ratios.items():
            middle = statistics.median(each)
            if name == "plain backbone":
                print(f"| {name} | {middle * 1e3:.1f} ms a batch ({each[0] * 1e3:.1f}-{each[-1] * 1e3:.1f}) |")
            else:
                print(f"| {name} | {middle:.4f} ({each[0]:.4f}-{each[-1]:.4f}) |")
        return
    if args.breakdown:
        print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads; "
              f"resnet50, batch {args.batch} at {args.size}, median of {args.repeats} rounds, over plain")
        for label, ratio in breakdown(args.batch, args.size, args.repeats).items():
            print(f"| {label} | {ratio:.3f} |")
        return
    rows = {label: measure(name, stages, args.batch, args.size, args.repeats) for label, (name, stages) in CASES.items()}
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(f"batch {args.batch} at {args.size}x{args.size}, eval, inference_mode, median of {args.repeats} alternating runs")
    header = ("| model | backbone GFLOPs/img | heads MFLOPs/img | plain s | wrapped s | measured ratio | FLOPs-predicted ratio "
              "| excess | wrap() s |")
    print(header)
    print("|---" * 9 + "|")
    for label, r in rows.items():
        excess = (r["measured"] / r["predicted"] - 1) * 100
        print(f"| {label} | {r['backbone_gflops']:.2f} | {r['heads_mflops']:.3f} | {r['plain_s']:.3f} | {r['wrapped_s']:.3f} "
              f"| {r['measured']:.4f} | {r['predicted']:.4f} | {excess:+.1f} % | {r['wrap_s']:.2f} |")


if __name__ == "__main__":
    main()
