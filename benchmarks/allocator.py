"""What glibc's malloc does to CPU timings: big activations given back to the system after every call,
and page-faulted in again on the next.

glibc serves an allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as such
blocks are freed) with a fresh mapping and unmaps it on free, and trims the heap's free top above
its trim threshold. A network's activations are such blocks, the early layers' the largest: each
call then takes a page fault per 4 KiB of them, and the kernel zeroes each page. This script runs
the same measurements in a child process per allocator setting (glibc reads them at start-up):

- ``glibc defaults``;
- ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184``: no block from a fresh mapping, and
  the heap never trimmed below 16 GiB, so freed activations are reused, not faulted in again.

For each: resnet50 (timm, exits after layer1-3) at 3x64x64 batch 64 and at 3x224x224 batch 16,
the plain backbone's median time and minor page faults per call, each segment's share of the
time beside its share of the FLOPs, and the speedup predicted from those times when 50 / 20 / 13
/ 17 % of the images leave at each exit (the shares `benchmarks/stream.py` sees), beside the
FLOPs-predicted one; all from one `profile_exits` per case, `--rounds` alternating rounds.

    python benchmarks/allocator.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings

SETTINGS = {
    "glibc defaults": {},
    "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"},
}
CASES = [((3, 64, 64), 64), ((3, 224, 224), 16)]
SHARES = [0.50, 0.20, 0.13, 0.17]


def child(rounds: int) -> None:
    import timm
    import torch

    import timm_exits
    from common import allocator
    from timm_exits.runtime import exit_costs

    warnings.filterwarnings("ignore")
    rows = []
    for size, batch in CASES:
        torch.manual_seed(0)
        model = timm_exits.wrap(timm.create_model("resnet50", num_classes=10), stages=[1, 2, 3], input_size=size).eval()
        x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(1))
        faults = {}

        def plain(model=model, x=x, faults=faults):  # this case's, bound as defaults
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model.backbone(x)
            faults.setdefault("plain", []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        profile = timm_exits.profile_exits(model, x, repeats=rounds, beside={"plain, counted": plain})
        reached = [e.backbone_flops for e in timm_exits.flops_report(model, input_size=size).exits]
        spent = sum(s * c for s, c in zip(SHARES, exit_costs(model, size)))  # a sample leaving at k: the backbone to k and heads 0..k
        rows.append({
            "case": f"{size[0]}x{size[1]}x{size[2]}, batch {batch}",
            "plain_ms": 1e3 * profile.beside_seconds["plain, counted"],
            "faults": statistics.median(faults["plain"][1:]),  # the warm-up round's call left out
            "time_shares": [t / sum(profile.segment_seconds) for t in profile.segment_seconds],
            "flops_shares": [(b - a) / reached[-1] for a, b in zip([0] + reached, reached)],
            "time_predicted": profile.predicted_speedup(SHARES),
            "flops_predicted": reached[-1] / spent,
        })
    print(json.dumps({"allocator": allocator(), "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph: the summary takes two lines
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.rounds)
    import timm
    import torch

    from common import cpu_name

    print(f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/allocator.py --rounds {args.rounds}`\n")
    print("| allocator | resnet50 | plain (ms / batch) | minor page faults / call | segments' share of the time | of the FLOPs "
          "| time-predicted | FLOPs-predicted |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    for name, env in SETTINGS.items():
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
        out = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)],
                             env={**clean, **env}, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the child under {name} failed:\n{out.stderr}")
        child_said = json.loads(out.stdout.strip().splitlines()[-1])
        assert child_said["allocator"] == f"allocator {name}", child_said["allocator"]  # the child ran under the setting named
        for row in child_said["rows"]:
            shares = lambda v: " / ".join(f"{100 * s:.0f} %" for s in v)  # noqa: E731
            print(f"| {name} | {row['case']} | {row['plain_ms']:.1f} | {row['faults']:.0f} "
                  f"| {shares(row['time_shares'])} | {shares(row['flops_shares'])} "
                  f"| {row['time_predicted']:.2f}x | {row['flops_predicted']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
