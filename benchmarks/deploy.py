"""What the one-file early exit saves in ONNX Runtime: batch-1 latency of `export_onnx`'s file against the plain backbone's.

For each model (random weights, exits after three stages), 64 random images are cached through
every exit and thresholds are calibrated on them for three FLOPs budgets (25, 50 and 75 % of the
way from the first exit's cost to the whole model's), so that the images leave at a mix of exits.
Each operating point is exported with `timm_exits.export_onnx`; the plain timm model is exported
the same way (`torch.export` with a dynamic batch, then `torch.onnx.export(..., dynamo=True)`), and
so is each step alone (segment and head, `export_exits`). ONNX Runtime (CPU, one session each, the
same thread count) then runs the 64 images one at a time, every file in turn within a round, for
`--repeats` rounds after a warm-up round; an image's latency is its median over the rounds.

Three speedups over the plain file, for each operating point:

- measured: the plain file's mean latency over the early-exit file's;
- time-predicted: the plain file's mean latency over what the steps' own latencies predict at
  the exit shares (an image leaving at exit k costs steps 1..k);
- FLOPs-predicted: the backbone's FLOPs over the mean FLOPs early exit spends, heads included.

A last row, "nobody leaves", is a file whose thresholds no image reaches: every decision is in
its graph and every step runs, so its latency over the chained steps' is what the decisions cost.
Each file is also written for one image at a time (``dynamic_batch=False``), without the row
bookkeeping a batch needs, and timed beside.

    python benchmarks/deploy.py [--repeats 5] [--images 64] [--models resnet18 vit_tiny_patch16_224]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch

import timm_exits
from common import cpu_name

CASES = {
    "resnet18": dict(model="resnet18", stages=[1, 2, 3], size=64, kwargs={}),
    "vit_tiny_patch16_224": dict(model="vit_tiny_patch16_224", stages=[3, 6, 9], size=224, kwargs={}),
}
BUDGETS = (0.25, 0.5, 0.75)


def onnx_of_program(program: torch.export.ExportedProgram, path: Path) -> Path:
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return path


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # after a run, ONNX Runtime's worker threads spin for a while; with a dozen sessions taking turns on two cores, the
    # spinning threads of the last session slow the next one (the chained steps took three to five times as long)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # the exporter's unused initializers are warned about once per file
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def chained(steps: list[onnxruntime.InferenceSession]):
    """Run the step files in turn on one image, as a runtime over per-step files would; returns each step's latency."""

    def run(image: np.ndarray) -> list[float]:
        carried, seconds = [image], []
        for step in steps:
            feed = {i.name: v for i, v in zip(step.get_inputs(), carried)}
            start = time.perf_counter()
            outputs = step.run(None, feed)
            seconds.append(time.perf_counter() - start)
            carried = outputs[1:]
        return seconds

    return run


@torch.no_grad()
def measure(name: str, images: int, repeats: int, folder: Path, threads: int) -> list[dict]:
    case = CASES[name]
    torch.manual_seed(0)
    size = case["size"]
    backbone = timm.create_model(case["model"], num_classes=10, **case["kwargs"]).eval()
    model = timm_exits.wrap(backbone, stages=case["stages"], input_size=(3, size, size)).eval()
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    cached = timm_exits.collect_exit_logits(model, [(x, torch.zeros(images, dtype=torch.long))], progress=False)
    first, full = cached.flops[0], cached.flops[-1]
    backbone_flops = timm_exits.flops_report(model).backbone_flops
    points = {f"{share:.0%} budget": timm_exits.calibrate_thresholds(cached, first + share * (full - first)) for share in BUDGETS}

    files = {}
    start = time.perf_counter()
    plain = torch.export.export(backbone, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},))
    files["plain"] = onnx_of_program(plain, folder / f"{name}-plain.onnx")
    decided = {**points, "nobody leaves": [1.5] * (model.num_exits - 1)}
    for label, threshold in decided.items():
        stem = f"{name}-{label.split()[0]}"
        files[label] = timm_exits.export_onnx(model, folder / f"{stem}.onnx", x[:1], threshold=threshold)
        files[f"{label}, one image"] = timm_exits.export_onnx(model, folder / f"{stem}-one.onnx", x[:1], threshold=threshold,
                                                              dynamic_batch=False)
    exported = timm_exits.export_exits(model, x[:2], whole=False)
    step_files = [onnx_of_program(p, folder / f"{name}-step{k}.onnx") for k, p in enumerate(exported.steps)]
    export_s = time.perf_counter() - start

    sessions = {label: session(path, threads) for label, path in files.items()}
    steps = chained([session(path, threads) for path in step_files])
    batch = x.numpy()
    got = {label: {i: [] for i in range(images)} for label in sessions}
    step_s = [[[] for _ in range(images)] for _ in step_files]
    for round_ in range(repeats + 1):  # round 0 warms up
        for label, s in sessions.items():
            for i in range(images):
                feed = {s.get_inputs()[0].name: batch[i : i + 1]}
                begin = time.perf_counter()
                s.run(None, feed)
                if round_:
                    got[label][i].append(time.perf_counter() - begin)
        for i in range(images):
            each = steps(batch[i : i + 1])
            if round_:
                for k, t in enumerate(each):
                    step_s[k][i].append(t)
    latency = {label: [statistics.median(v[i]) for i in range(images)] for label, v in got.items()}
    step_mean = [statistics.fmean(statistics.median(per_image) for per_image in k_s) for k_s in step_s]
    cumulative = np.cumsum(step_mean)
    plain_mean = statistics.fmean(latency["plain"])

    rows = []
    for label in (*points, "nobody leaves"):
        calibration = points.get(label)
        early = latency[label]
        row = {"model": name, "size": size, "point": label, "p50": np.percentile(early, 50), "p95": np.percentile(early, 95),
               "mean": statistics.fmean(early), "plain_p50": np.percentile(latency["plain"], 50),
               "plain_p95": np.percentile(latency["plain"], 95), "export_s": export_s}
        row["measured"] = plain_mean / row["mean"]
        row["measured_one"] = plain_mean / statistics.fmean(latency[f"{label}, one image"])
        if calibration is not None:
            shares = calibration.exit_shares
            row["shares"] = shares
            row["time_predicted"] = plain_mean / float(np.dot(shares, cumulative))
            row["flops_predicted"] = backbone_flops / calibration.flops
        else:
            row["shares"] = [0.0] * (model.num_exits - 1) + [1.0]
            row["time_predicted"] = plain_mean / float(cumulative[-1])
            row["flops_predicted"] = backbone_flops / full
        row["steps"] = step_mean
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    print(f"Machine: {cpu_name()}, {threads} threads; torch {torch.__version__}, timm {timm.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {time.strftime('%Y-%m-%d')}\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += measure(name, args.images, args.repeats, Path(folder), threads)
    print("| model | input | operating point | images leaving at exit 1/2/3/4 | early-exit file p50 / p95 (ms) "
          "| plain file p50 / p95 (ms) | measured speedup | time-predicted | FLOPs-predicted | measured / time-predicted "
          "| one-image file: measured | its measured / time-predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shares = " / ".join(f"{s:.0%}" for s in r["shares"])
        print(f"| {r['model']} | {r['size']}x{r['size']} | {r['point']} | {shares} | {r['p50'] * 1e3:.2f} / {r['p95'] * 1e3:.2f} "
              f"| {r['plain_p50'] * 1e3:.2f} / {r['plain_p95'] * 1e3:.2f} | {r['measured']:.2f}x | {r['time_predicted']:.2f}x "
              f"| {r['flops_predicted']:.2f}x | {r['measured'] / r['time_predicted']:.0%} | {r['measured_one']:.2f}x "
              f"| {r['measured_one'] / r['time_predicted']:.0%} |")
    print("\n| model | steps' ONNX Runtime latency, batch 1 (ms) | export time, all files (s) |")
    print("|---|---|---|")
    for r in rows[:: len(BUDGETS) + 1]:
        print(f"| {r['model']} | {' / '.join(f'{t * 1e3:.2f}' for t in r['steps'])} | {r['export_s']:.0f} |")
    print(f"\nONNX Runtime CPUExecutionProvider, intra-op threads {threads} (not spinning between runs), "
          "graph optimisations at their default (all).",
          f"os.cpu_count() = {os.cpu_count()}.")


if __name__ == "__main__":
    main()
