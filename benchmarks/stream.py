"""Early exit at batch 64 (or 1), per batch (`early_exit`) and over a stream (`early_exit_stream`), against the time prediction.

For each model (untrained weights; thresholds at each exit's median confidence on the images, so
that about half of those still running leave at each exit): images per second of the plain
backbone, of `early_exit` batch by batch, and of `early_exit_stream` (every segment on full
batches), over `--images` images in batches of `--batch-size` (64), median of `--rounds` alternating
rounds; each speedup over the plain model measured, time-predicted (`profile_exits` at that batch
size, its parts timed in the same rounds) and FLOPs-predicted, and the measured share of the
time-predicted one (the goal: 95 %), taken round by round: its median, and in brackets its
lowest and highest round.

    python benchmarks/stream.py [--rounds 5] [--images 640] [--batch-size 64] [--channels-last] [--model resnet50]

``--batch-size 1`` times every image alone (latency): there is nothing for the stream to regroup
then, and the time prediction comes from segments profiled at batch 1.

``--channels-last`` adds, for the convolutional models, a copy of the model and images in
``torch.channels_last`` timed in the same alternating rounds: the plain model in each memory
format, and early exit in channels_last against the plain model in channels_last and its own
time prediction.
"""
from __future__ import annotations

import argparse
import statistics
import warnings

import timm
import torch

import timm_exits
from common import allocator, cpu_name, median_thresholds

MODELS = {
    "resnet18, 1x32x32 (the demo's shape)": (lambda: timm.create_model("resnet18", num_classes=10, in_chans=1), [1, 2, 3], (1, 32, 32)),
    "resnet50, 3x64x64": (lambda: timm.create_model("resnet50", num_classes=10), [1, 2, 3], (3, 64, 64)),
    "vit_tiny_patch16, 3x64x64": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64), [3, 6, 9], (3, 64, 64)),
}


def selected(args) -> list:
    """The models whose names hold one of `--model`'s strings (all without it)."""
    chosen = [(name, spec) for name, spec in MODELS.items() if not args.model or any(m in name for m in args.model)]
    if not chosen:
        raise SystemExit(f"--model {args.model} names none of {list(MODELS)}")
    return chosen


def prepared(build, stages, size, args, batch_size: int):
    """The wrapped model (eval), `--images` images in batches, the thresholds, each exit's share of the images and the
    FLOPs-predicted speedup."""
    torch.manual_seed(0)
    model = timm_exits.wrap(build(), stages=stages, input_size=size).eval()
    images = torch.randn(args.images, *size, generator=torch.Generator().manual_seed(1))
    thresholds = median_thresholds(model, images)
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    result = timm_exits.early_exit_stream(model, batches, threshold=thresholds)
    shares = [c / len(images) for c in result.exit_counts(model.num_exits)]
    flops = timm_exits.flops_report(model, input_size=size).exits[-1].flops / float(result.flops.float().mean())
    return model, batches, thresholds, shares, flops


def share_of_prediction(profile, plain: str, label: str, shares: list[float]) -> str:
    """The measured speedup's share of the time-predicted one, round by round: the median (lowest-highest)."""
    each = sorted(p.beside_seconds[plain] / p.beside_seconds[label] / p.predicted_speedup(shares) for p in profile.rounds())
    return f"{statistics.median(each):.0%} ({each[0]:.0%}-{each[-1]:.0%})"


def timed_runs(model, batches, thresholds) -> dict:
    """The plain model, early exit batch by batch and the stream over `batches`: what `profile_exits` times beside its parts."""
    return {
        "plain": lambda: [model.backbone(b) for b in batches],
        "per batch": lambda: [model.early_exit(b, threshold=thresholds) for b in batches],
        "stream": lambda: timm_exits.early_exit_stream(model, batches, threshold=thresholds),
    }


def models(args) -> str:
    return "".join(f" --model {m}" for m in args.model or [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--model", action="append", help="time only the models whose name holds this (repeatable): resnet18, resnet50, vit")
    args = parser.parse_args()
    if args.channels_last:
        if not any("vit" not in name for name, _ in selected(args)):
            raise SystemExit("--channels-last times the convolutional models only; --model names none of them")
        return channels_last(args)
    warnings.filterwarnings("ignore")
    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, {allocator()}; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/stream.py --rounds {args.rounds} --images {args.images} --batch-size {args.batch_size}"
          f"{models(args)}`\n")
    print("| model | leaving at each exit | plain (images/s) | early exit per batch: measured / share of time-predicted "
          "| stream: measured / share of time-predicted | time-predicted | FLOPs-predicted |")
    print("|---|---|---:|---|---|---:|---:|")
    for name, (build, stages, size) in selected(args):
        model, batches, thresholds, shares, flops = prepared(build, stages, size, args, args.batch_size)
        runs = timed_runs(model, batches, thresholds)
        profile = timm_exits.profile_exits(model, batches[0], repeats=args.rounds, beside=runs)  # measured and predicted in the same rounds
        seconds, predicted = profile.beside_seconds, profile.predicted_speedup(shares)
        cells = [f"{seconds['plain'] / seconds[label]:.2f}x / {share_of_prediction(profile, 'plain', label, shares)}"
                 for label in ("per batch", "stream")]
        print(f"| {name} | {' / '.join(f'{100 * s:.0f} %' for s in shares)} | {args.images / seconds['plain']:.0f} "
              f"| {cells[0]} | {cells[1]} | {predicted:.2f}x | {flops:.2f}x |", flush=True)


def channels_last(args) -> None:
    """Each CNN in both memory formats, timed in the same rounds."""
    import copy

    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, {allocator()}; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/stream.py --channels-last --rounds {args.rounds} --images {args.images}{models(args)}`\n")
    print("| model | plain: channels_last over contiguous (time) "
          "| early exit per batch, channels_last: speedup / share of time-predicted | stream, channels_last: speedup / share "
          "| time-predicted, channels_last | FLOPs-predicted | contiguous, same rounds: per batch / stream speedups |")
    print("|---|---:|---|---|---:|---:|---|")
    for name, (build, stages, size) in selected(args):
        if "vit" in name:
            continue  # no convolutions after the patch embedding: the memory format does not apply
        model, batches, thresholds, shares, flops = prepared(build, stages, size, args, 64)
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        batches_last = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        contiguous_runs, last_runs = timed_runs(model, batches, thresholds), timed_runs(last, batches_last, thresholds)
        runs = {}
        for label in ("plain", "per batch", "stream"):  # each run beside its channels_last twin, in the rounds' order
            runs[label], runs[f"{label}, channels_last"] = contiguous_runs[label], last_runs[label]
        # measured and predicted in the same rounds
        profile = timm_exits.profile_exits(last, batches_last[0], repeats=args.rounds, beside=runs)
        seconds, predicted = profile.beside_seconds, profile.predicted_speedup(shares)
        cells = [f"{seconds['plain, channels_last'] / seconds[label]:.2f}x / "
                 f"{share_of_prediction(profile, 'plain, channels_last', label, shares)}"
                 for label in ("per batch, channels_last", "stream, channels_last")]
        contiguous = " / ".join(f"{seconds['plain'] / seconds[k]:.2f}x" for k in ("per batch", "stream"))
        print(f"| {name} | {seconds['plain, channels_last'] / seconds['plain']:.2f} | {cells[0]} | {cells[1]} "
              f"| {predicted:.2f}x | {flops:.2f}x | {contiguous} |", flush=True)


if __name__ == "__main__":
    main()
