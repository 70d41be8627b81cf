"""Wall-clock speedup of `early_exit` against the speedup its FLOPs predict, and against computing every exit.

For resnet50 and vit_small_patch16_224 (random weights, exits after three stages), 64 random
224x224 images are cached through every exit, and thresholds are calibrated on them for three
budgets (25, 50 and 75 % of the way from the first exit's cost to the whole model's), so that
the images leave at a mix of exits. At batch 64 and at batch 1 (the same 64 images one by one),
one process times, alternately: the plain backbone, the wrapped model computing every exit and
then selecting, and `early_exit` at each operating point. Speedups are ratios of medians.

With `earlyon` installed (a per-exit early-exit package on PyPI), its torchvision resnet50 is
timed beside ours on the same weights, with every image forced out at the same exit.

A last table times each segment alone, to compare where the time goes with where the FLOPs go.

    python benchmarks/early_exit.py [--repeats 3] [--images 64] [--segments-only]
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
import warnings

import timm
import torch

import timm_exits
from common import cpu_name
from timm_exits.cost.profile import alternating_medians

CASES = {"resnet50": ("resnet50", [1, 2, 3]), "vit_small_patch16_224": ("vit_small_patch16_224", [3, 6, 9])}


medians = alternating_medians  # time every callable once per round, `repeats` rounds after a warm-up round


def one_by_one(fn, x):
    return lambda: [fn(x[i : i + 1]) for i in range(x.shape[0])]


@torch.no_grad()
def measure(name: str, stages, images: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    plain = timm.create_model(name).eval()
    model = timm_exits.wrap(plain, stages=stages).eval()
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cached = timm_exits.collect_exit_logits(model, [(x, torch.zeros(images, dtype=torch.long))])
    first, full = cached.flops[0], cached.flops[-1]
    backbone = timm_exits.flops_report(model).backbone_flops
    points = {}
    for share in (0.25, 0.5, 0.75):
        calibration = timm_exits.calibrate_thresholds(cached, first + share * (full - first))
        points[f"{share:.0%} budget"] = calibration
    spent = torch.tensor(cached.flops)
    thresholds = torch.tensor(points["50% budget"].thresholds + [0.0])  # the last exit takes everyone left

    def select_all(batch):  # the usual way: compute every exit, then pick, per sample, the first confident one
        outputs = torch.stack(model.forward_exits(batch))  # (E, B, C)
        passed = outputs.softmax(-1).amax(-1) >= thresholds.unsqueeze(1)
        exit_index = passed.float().argmax(0)
        return outputs[exit_index, torch.arange(outputs.shape[1])], exit_index, spent[exit_index]

    rows = []
    for batch in (images, 1):
        runs = {"plain": (lambda: plain(x)) if batch > 1 else one_by_one(plain, x),
                "all exits, then select": (lambda: select_all(x)) if batch > 1 else one_by_one(select_all, x)}
        for label, c in points.items():
            run = lambda b, t=c.thresholds: model.early_exit(b, threshold=t)  # noqa: E731
            runs[label] = (lambda run=run: run(x)) if batch > 1 else one_by_one(run, x)
        t = medians(runs, repeats)
        for label, c in points.items():
            predicted = backbone / c.flops
            rows.append({"model": name, "batch": batch, "point": label, "shares": c.exit_shares, "predicted": predicted,
                         "measured": t["plain"] / t[label], "vs_select": t["all exits, then select"] / t[label],
                         "plain_s": t["plain"], "early_s": t[label]})
    return rows


@torch.no_grad()
def measure_earlyon(images: int, repeats: int) -> list[dict] | None:
    try:
        from earlyon.models import resnet50_ee
    except ImportError:
        return None
    torch.manual_seed(0)
    theirs = resnet50_ee(num_classes=1000, pretrained=False).eval()
    backbone = copy.deepcopy(theirs.backbone)
    for module in backbone.modules():  # the copy must not carry their routing hooks
        module._forward_hooks.clear()
    plain = copy.deepcopy(backbone)
    ours = timm_exits.wrap(backbone, stages=["layer1", "layer2", "layer3"]).eval()
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    for exit_k in (0, 1, 2, 3):  # everyone forced out at exit k (3 = the backbone's head)
        enabled = [k == exit_k for k in range(3)]
        theirs.config.enabled_exits = enabled
        theirs.config.confidence_thresholds = [0.0] * 3
        ours_t = [0.0 if k == exit_k else float("inf") for k in range(3)]
        for batch in (images, 1):
            if batch > 1:
                runs = {"plain": lambda: plain(x), "timm-exits": lambda t=ours_t: ours.early_exit(x, threshold=t),
                        "earlyon": lambda: theirs.forward_inference_batched(x)}
            else:
                runs = {"plain": one_by_one(plain, x), "timm-exits": one_by_one(lambda b, t=ours_t: ours.early_exit(b, threshold=t), x),
                        "earlyon": one_by_one(lambda b: theirs(b, mode="inference"), x)}
            t = medians(runs, repeats)
            rows.append({"exit": exit_k + 1, "batch": batch, "ours": t["plain"] / t["timm-exits"], "earlyon": t["plain"] / t["earlyon"]})
    return rows


@torch.no_grad()
def segment_shares(name: str, stages, images: int, repeats: int) -> dict:
    """Each segment's share of the time against its share of the FLOPs, and the cost of routing when nobody leaves."""
    torch.manual_seed(0)
    plain = timm.create_model(name).eval()
    model = timm_exits.wrap(plain, stages=stages).eval()
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    report = timm_exits.flops_report(model).exits
    flops = [report[0].backbone_flops] + [b.backbone_flops - a.backbone_flops for a, b in itertools.pairwise(report)]
    seconds = [[] for _ in range(model.num_exits)]

    def run_segments():  # the time to each exit from the one before: a segment and its (small) head
        t = time.perf_counter()
        for out in model.run(x):
            now = time.perf_counter()
            seconds[out.index].append(now - t)
            t = now

    t = medians({"plain": lambda: plain(x), "all exits": lambda: model(x),
                 "nobody leaves": lambda: model.early_exit(x, threshold=float("inf")), "segments": run_segments}, repeats)
    seg = [statistics.median(s[1:]) for s in seconds]  # the first call was the warm-up
    return {"time": [v / sum(seg) for v in seg], "flops": [v / sum(flops) for v in flops],
            "all": t["all exits"] / t["plain"], "none": t["nobody leaves"] / t["plain"]}


def print_segment_shares(images: int, repeats: int) -> None:
    print(f"\nper segment at batch {images}: share of the time / share of the FLOPs; "
          "time of the wrapped forward and of early_exit with nobody leaving, over the plain model")
    print("| model | segments' time shares | segments' FLOPs shares | all exits / plain | early_exit, nobody leaves / plain |")
    print("|---|---|---|---|---|")
    for name, stages in CASES.values():
        r = segment_shares(name, stages, images, repeats)
        fmt = lambda v: " / ".join(f"{s:.1%}" for s in v)  # noqa: E731
        print(f"| {name} | {fmt(r['time'])} | {fmt(r['flops'])} | {r['all']:.3f} | {r['none']:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--segments-only", action="store_true", help="only the per-segment time vs FLOPs table")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    if args.segments_only:
        print_segment_shares(args.images, args.repeats)
        return
    print(f"{args.images} random 224x224 images, eval, no_grad, median of {args.repeats} alternating rounds after a warm-up round")
    print("| model | batch | operating point | images leaving at exit 1/2/3/4 | FLOPs-predicted speedup | measured speedup "
          "| measured / predicted | vs all exits, then select |")
    print("|---" * 8 + "|")
    for name, stages in CASES.values():
        for r in measure(name, stages, args.images, args.repeats):
            shares = " / ".join(f"{s:.0%}" for s in r["shares"])
            print(f"| {r['model']} | {r['batch']} | {r['point']} | {shares} | {r['predicted']:.2f}x | {r['measured']:.2f}x "
                  f"| {r['measured'] / r['predicted']:.0%} | {r['vs_select']:.2f}x |", flush=True)
    print_segment_shares(args.images, args.repeats)
    rows = measure_earlyon(args.images, args.repeats)
    if rows is None:
        print("\nearlyon is not installed: no comparison")
        return
    print("\nspeedup over the plain torchvision resnet50, every image forced out at one exit (same weights, same inputs)")
    print("| exit | batch | timm-exits early_exit | earlyon |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['exit']} | {r['batch']} | {r['ours']:.2f}x | {r['earlyon']:.2f}x |")


if __name__ == "__main__":
    main()
