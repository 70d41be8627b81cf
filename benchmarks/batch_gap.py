"""Why early exit at batch 64 falls short of the time prediction: each segment timed at the batch it really sees.

The demo's model shape (resnet18, 1x32x32, untrained, thresholds at each exit's median
confidence on 64 images). Times, in alternating rounds: each segment and head at the batch size
it sees inside `early_exit`, the plain model and `early_exit` at 64; then the speedup predicted
from those sizes, the one measured, and the one `profile_exits` predicts from batch-64 rates.

    python benchmarks/batch_gap.py [--rounds 15] [--model resnet50]

``--model resnet50``: timm's resnet50 at 3x64x64 (exits after layer1..layer3), as
`benchmarks/stream.py` times it.
"""
from __future__ import annotations

import argparse

import timm
import torch

import timm_exits
from common import median_thresholds
from timm_exits.cost.profile import alternating_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet18")
    args = parser.parse_args()
    torch.manual_seed(0)
    size = (1, 32, 32) if args.model == "resnet18" else (3, 64, 64)
    model = timm_exits.wrap(timm.create_model(args.model, num_classes=10, in_chans=size[0]), stages=[1, 2, 3], input_size=size).eval()
    x = torch.randn(64, *size, generator=torch.Generator().manual_seed(1))
    thresholds = median_thresholds(model, x)
    counts = model.early_exit(x, threshold=thresholds).exit_counts(4)
    sizes = [64 - sum(counts[:k]) for k in range(4)]
    print(f"leaving at each exit {counts}; the batch each segment sees {sizes}")
    parts = {}
    with torch.no_grad():
        carried = (x,)
        for k, step in enumerate(model.steps(training=False)):
            read, previous = step.split(carried)
            read_n = tuple(t[: sizes[k]] if isinstance(t, torch.Tensor) else t for t in read)
            out, _ = step.segment(*read_n)
            parts[f"segment {k + 1} at {sizes[k]}"] = lambda s=step.segment, c=read_n: s(*c)
            if step.head is not None:  # each value bound as a default: the parts run after the loop, when k is the last exit's
                n = sizes[k]
                parts[f"head {k + 1} at {n}"] = lambda st=step, o=out, p=previous, n=n: st.logits(o, p if p is None else p[:n])
            full, carried = step.segment(*read)
            if step.head is not None:
                carried = step.onward(carried, step.logits(full, previous))
        parts["plain at 64"] = lambda: model.backbone(x)
        parts["early exit at 64"] = lambda: model.early_exit(x, threshold=thresholds)
        seconds = alternating_medians(parts, args.rounds)
    for name, t in seconds.items():
        print(f"{name:>18}: {1e3 * t:.3f} ms")
    aware = sum(t for name, t in seconds.items() if name.startswith(("segment", "head")))
    predicted = timm_exits.profile_exits(model, x, repeats=args.rounds).predicted_speedup([c / 64 for c in counts])
    spent = model.early_exit(x, threshold=thresholds).flops.float().mean()
    # the backbone's FLOPs over those spent
    flops = timm_exits.flops_report(model, input_size=tuple(x.shape[1:])).exits[-1].flops / float(spent)
    print(f"predicted at the sizes seen {1e3 * aware:.3f} ms: {seconds['plain at 64'] / aware:.2f}x; "
          f"measured {seconds['plain at 64'] / seconds['early exit at 64']:.2f}x "
          f"(bookkeeping {1e3 * (seconds['early exit at 64'] - aware):.3f} ms); "
          f"time-predicted from batch-64 rates {predicted:.2f}x; FLOPs-predicted {flops:.2f}x")


if __name__ == "__main__":
    main()
