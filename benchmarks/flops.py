"""Time of `flops_report` on a wrapped model against one fvcore analysis of the plain model.

The report traces the wrapped model once and reads every exit from that one analysis, so it
should cost about one fvcore analysis, not one per exit. Both are timed alternately in one
process (drift on a shared machine hits both alike); the ratio of their medians is the result.

    python benchmarks/flops.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch
from fvcore.nn import FlopCountAnalysis

import timm_exits
from common import cpu_name

CASES = {
    "resnet50, exits after layer1-3": ("resnet50", [1, 2, 3]),
    "vit_small_patch16_224, exits after blocks 3, 6, 9": ("vit_small_patch16_224", [3, 6, 9]),
}


def fvcore_total(model, x) -> float:
    analysis = FlopCountAnalysis(model, (x,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


@torch.no_grad()
def measure(name: str, stages, repeats: int) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model(name).eval()
    wrapped = timm_exits.wrap(plain, stages=stages)
    x = torch.randn(1, 3, 224, 224)
    times = {"fvcore": [], "report": []}
    for _ in range(repeats + 1):  # the first round warms up
        t = time.perf_counter()
        plain_flops = fvcore_total(plain, x)
        times["fvcore"].append(time.perf_counter() - t)
        t = time.perf_counter()
        report = timm_exits.flops_report(wrapped, input_size=(3, 224, 224))
        times["report"].append(time.perf_counter() - t)
    fvcore_s, report_s = statistics.median(times["fvcore"][1:]), statistics.median(times["report"][1:])
    return {"fvcore_s": fvcore_s, "report_s": report_s, "ratio": report_s / fvcore_s, "exits": len(report.exits),
            "plain_gflops": plain_flops / 1e9, "report_gflops": report.exits[-1].backbone_flops / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = {label: measure(name, stages, args.repeats) for label, (name, stages) in CASES.items()}
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(f"one 3x224x224 sample, median of {args.repeats} alternating runs after one warm-up round")
    print("| model | exits | one fvcore analysis of the plain model (s) | flops_report of the wrapped model (s) | ratio "
          "| plain GFLOPs (fvcore as shipped) | last exit GFLOPs (report) |")
    print("|---" * 7 + "|")
    for label, r in rows.items():
        print(f"| {label} | {r['exits']} | {r['fvcore_s']:.3f} | {r['report_s']:.3f} | {r['ratio']:.2f} "
              f"| {r['plain_gflops']:.3f} | {r['report_gflops']:.3f} |")


if __name__ == "__main__":
    main()
