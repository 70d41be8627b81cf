"""The pictures in the docs, drawn by the library's own code: the cut models and the demo's trade-off.

    python benchmarks/figures.py            # docs/figures/exits_resnet50.png, exits_vit_small.png
    python benchmarks/figures.py --demo     # also docs/figures/demo_tradeoff.png (trains the demo: ~3 minutes)
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import timm

import timm_exits

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also run the demo and keep its trade-off figure")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    out = ROOT / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for name, stages, file in (("resnet50", [1, 2, 3], "exits_resnet50.png"), ("vit_small_patch16_224", [3, 6, 9], "exits_vit_small.png")):
        model = timm_exits.wrap(timm.create_model(name), stages=stages)
        timm_exits.plot_exits(model, out / file)
        print(f"wrote {out / file}")
    if args.demo:
        from timm_exits.demo import run_demo

        run_demo(plot=str(out / "demo_tradeoff.png"), progress=False)
        print(f"wrote {out / 'demo_tradeoff.png'}")


if __name__ == "__main__":
    main()
