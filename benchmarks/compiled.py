"""Compiled training and compiled early exit, on the machine at hand.

1. **Train step.** resnet18 at 64x64, batch 32: wrapped (exits after layer1-3, linear heads,
   `ExitEnsembleLoss`) against plain (cross entropy), eager and through `torch.compile`
   (inductor), SGD. Median step-time ratio over alternating rounds after two warm-up steps (the
   first compiles); the compile time of each is the first step's. Goal: the heads' FLOPs share + 5 %.
2. **Early exit with compiled parts** (`timm_exits.compile_exits`) against the compiled plain
   model, at batch 1 and 64, on the demo's model shape (resnet18, 1x32x32, 10 classes; untrained
   weights, thresholds at each exit's median confidence on the images, so that about half of
   them leave at each exit), batch by batch and, at batch 64, over a stream
   (`early_exit_stream`). Speedups measured, time-predicted (`profile_exits` on the compiled
   parts, timed in the measured runs' rounds, against the compiled plain model's time; the share
   of it taken round by round, the median) and FLOPs-predicted; the graphs dynamo compiled during
   the timed runs (after warm-up), which should be none. ``--skip-train`` times early exit alone.

    python benchmarks/compiled.py [--rounds 5] [--images 200]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import timm
import torch
import torch.nn.functional as F

import timm_exits
from common import allocator, cpu_name, median_thresholds


def train_steps(compiled: bool, size: int, batch: int):
    """Plain and wrapped train steps (forward, backward, SGD), each a callable, and the seconds each first call took."""
    steps, first = {}, {}
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    for kind in ("plain", "wrapped"):
        torch.manual_seed(0)
        backbone = timm.create_model("resnet18", num_classes=10)
        if kind == "plain":
            model, loss_fn = backbone, F.cross_entropy
        else:
            model, loss_fn = timm_exits.wrap(backbone, stages=[1, 2, 3], input_size=(3, size, size)), timm_exits.ExitEnsembleLoss()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_of = (lambda m=model, f=loss_fn: f(m(x), y))  # noqa: E731 - one callable for torch.compile: the forward and the loss
        loss_of = torch.compile(loss_of) if compiled else loss_of

        def step(loss_of=loss_of, optimizer=optimizer):
            loss = loss_of()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        t = time.perf_counter()
        step()
        first[kind] = time.perf_counter() - t
        step()
        steps[kind] = step
    return steps, first


def over_batches(fn, images: torch.Tensor, batch: int):
    """A callable running `fn` on `images` in batches of `batch`, slicing as it goes."""
    return lambda: [fn(images[i : i + batch]) for i in range(0, len(images), batch)]


def streamed(model, images: torch.Tensor, batch: int, thresholds):
    """A callable running `early_exit_stream` over `images` in batches of `batch`, slicing as it goes."""
    return lambda: timm_exits.early_exit_stream(model, [images[i : i + batch] for i in range(0, len(images), batch)], threshold=thresholds)


def predicted_seconds(profile, shares: list[float]) -> float:
    """Seconds per image the profile predicts when `shares` of the images leave at each exit."""
    return sum(s * c for s, c in zip(shares, profile.seconds))


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=200, help="images timed one at a time at batch 1")
    parser.add_argument("--size", type=int, default=64, help="train step's image size")
    parser.add_argument("--skip-train", action="store_true", help="time early exit alone")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, {allocator()}; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/compiled.py --rounds {args.rounds} --images {args.images} --size {args.size}"
          f"{' --skip-train' if args.skip_train else ''}`\n")
    if not args.skip_train:
        compiled_train_steps(args)
    compiled_early_exit(args)


def compiled_train_steps(args) -> None:
    size = args.size
    report = timm_exits.flops_report(
        timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1, 2, 3], input_size=(3, size, size)),
        input_size=(3, size, size),
    )
    share = report.all_exits_flops / report.backbone_flops - 1
    print(f"Train step, resnet18 at {size}x{size}, batch 32; the heads' share of the FLOPs {100 * share:.2f} %, "
          f"goal: ratio <= {1 + share + 0.05:.3f}\n")
    print("| mode | plain step (ms) | wrapped step (ms) | ratio | first step, plain / wrapped (s) |")
    print("|---|---:|---:|---:|---|")
    for compiled in (False, True):
        steps, first = train_steps(compiled, size, 32)
        times = {kind: [] for kind in steps}
        for _ in range(args.rounds):
            for kind, step in steps.items():
                t = time.perf_counter()
                step()
                times[kind].append(time.perf_counter() - t)
        ratio = statistics.median(w / p for w, p in zip(times["wrapped"], times["plain"]))
        print(f"| {'compiled (inductor)' if compiled else 'eager'} "
              f"| {1e3 * statistics.median(times['plain']):.1f} | {1e3 * statistics.median(times['wrapped']):.1f} "
              f"| {ratio:.3f} | {first['plain']:.1f} / {first['wrapped']:.1f} |", flush=True)
        del steps


def compiled_early_exit(args) -> None:
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32)).eval()
    images = torch.randn(max(640, args.images), 1, 32, 32, generator=torch.Generator().manual_seed(1))
    thresholds = median_thresholds(model, images)
    flops = timm_exits.flops_report(model, input_size=(1, 32, 32))
    eager = copy.deepcopy(model)  # the same weights, uncompiled: the reference row
    plain = torch.compile(model.backbone)
    timm_exits.compile_exits(model)
    t = time.perf_counter()
    with torch.no_grad():
        for n in (1, 8, 64):  # warm-up: every part at each size class
            plain(images[:n])
            model.forward_exits(images[:n])
            model.early_exit(images[:n], threshold=thresholds)
    warm_up = time.perf_counter() - t
    before = graphs()
    print(f"\nEarly exit with compiled parts (inductor) against the compiled plain resnet18, 1x32x32; "
          f"warm-up (compiling) {warm_up:.0f} s.\n")
    print("| batch | plain (ms / image) | early exit (ms / image) | stream (ms / image) | leaving at exit 1 / 2 / 3 / 4 "
          "| early exit: measured / share of time-predicted "
          "| stream: measured / share | time-predicted | FLOPs-predicted | eager: plain / early exit (ms / image) |")
    print("|---:|---:|---:|---:|---|---|---|---:|---:|---|")
    for batch in (1, 64):
        timed = images[: args.images] if batch == 1 else images[:640]
        result = model.early_exit(timed, threshold=thresholds)
        shares = [c / len(timed) for c in result.exit_counts(4)]
        fns = {"plain": plain, "exit": lambda x: model.early_exit(x, threshold=thresholds),
               "eager plain": eager.backbone, "eager exit": lambda x: eager.early_exit(x, threshold=thresholds)}
        runs = {name: over_batches(fn, timed, batch) for name, fn in fns.items()}
        if batch > 1:
            runs["stream"] = streamed(model, timed, batch, thresholds)
        # the compiled parts profiled in the measured runs' rounds; the prediction is the compiled plain model's time over theirs
        profile = timm_exits.profile_exits(model, images[:batch], repeats=args.rounds, beside=runs)
        per_image = {name: t / len(timed) for name, t in profile.beside_seconds.items()}
        predicted_time = per_image["plain"] / predicted_seconds(profile, shares)
        predicted_flops = flops.exits[-1].flops / float(result.flops.float().mean())
        cells = {}
        for label in ("exit", "stream"):
            if label in runs:
                # measured over predicted, round by round
                each = sorted(predicted_seconds(p, shares) * len(timed) / p.beside_seconds[label] for p in profile.rounds())
                cells[label] = f"{per_image['plain'] / per_image[label]:.2f}x / {statistics.median(each):.0%}"
        stream = f"{1e3 * per_image['stream']:.3f}" if "stream" in runs else "-"
        print(f"| {batch} | {1e3 * per_image['plain']:.3f} | {1e3 * per_image['exit']:.3f} | {stream} "
              f"| {' / '.join(f'{100 * s:.0f} %' for s in shares)} | {cells['exit']} | {cells.get('stream', '-')} "
              f"| {predicted_time:.2f}x | {predicted_flops:.2f}x "
              f"| {1e3 * per_image['eager plain']:.3f} / {1e3 * per_image['eager exit']:.3f} |", flush=True)
    print(f"\nGraphs compiled during the timed runs, after warm-up: {graphs() - before}.")


if __name__ == "__main__":
    main()
