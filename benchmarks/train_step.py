"""A training step of wrapped resnet50 with exit-ensemble distillation against the plain model with CE.

    python benchmarks/train_step.py                 # eager and torch.compile (inductor), batch 32, 224x224
    python benchmarks/train_step.py --no-compile    # eager only
    python benchmarks/train_step.py --memory-only   # peak memory alone (load does not change it)
    python benchmarks/train_step.py --saved         # activations saved for backward only (exact, seconds)

Step times are measured in one process, wrapped and plain alternating, and reported as the
median ratio (absolute times on a shared machine are noise). Peak memory of a step is measured
per configuration in a fresh process, after two warm-up steps, above what is in use before the
step: on CUDA `max_memory_allocated`; on CPU the bytes glibc's malloc has handed out and not yet
taken back (``mallinfo2``: ``uordblks + hblkhd``), read after every aten op of an eager step
(the allocator-level measurement), and beside it the peak resident set (Linux VmHWM, reset
before the step), which also counts memory malloc has freed but kept. The prediction is the
heads' share of the FLOPs (`flops_report`): a training step costs about three forwards, in both
models, so the ratio should be 1 + that share.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

import timm_exits
from common import cpu_name, malloc_in_use

STAGES = [1, 2, 3]


def build(kind: str, device: torch.device):
    torch.manual_seed(0)
    backbone = timm.create_model("resnet50", num_classes=1000)
    if kind == "plain":
        model, loss_fn = backbone, nn.CrossEntropyLoss()
    else:
        model, loss_fn = timm_exits.wrap(backbone, stages=STAGES), timm_exits.ExitEnsembleLoss()
    step_fn = lambda x, y: loss_fn(model(x), y)  # noqa: E731
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, step_fn, optimizer


def make_step(kind: str, compiled: bool, device: torch.device):
    _, loss_of, optimizer = build(kind, device)  # the model lives on in loss_of
    if compiled:
        loss_of = torch.compile(loss_of)

    def step(x, y):
        loss = loss_of(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, x, y, device) -> float:
    sync(device)
    start = time.perf_counter()
    step(x, y)
    sync(device)
    return time.perf_counter() - start


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def allocated_peak(step, x, y, in_use) -> float:
    """MiB: the most malloc had handed out after any aten op of one step, above what it had before the step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    base = in_use()
    with Peak() as peak:
        step(x, y)
    return (peak.peak - base) / 2**20


def memory(kind: str, compiled: bool, batch: int, size: int) -> dict:
    """Peak memory of a step above what the model and optimizer hold (run in a fresh process)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = make_step(kind, compiled, device)
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)
    for _ in range(2):  # warm-up: compilation, optimizer state, allocator pools
        step(x, y)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(x, y)
        sync(device)
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    base = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step(x, y)
    result = {"rss_peak_mib": (rss_kib("VmHWM") - base) / 1024}
    in_use = malloc_in_use()
    if in_use is not None and not compiled:  # inductor's kernels allocate outside aten ops: the samples would miss them
        result["peak_mib"] = allocated_peak(step, x, y, in_use)
    return result


def saved_for_backward(kind: str, batch: int, size: int) -> float:
    """MiB of tensors autograd saves in one eager training forward (each storage counted once)."""
    _, loss_of, _ = build(kind, torch.device("cpu"))
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(x, y)
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="peak memory alone, no step times")
    parser.add_argument("--saved", action="store_true", help="only the activations saved for backward, eager, plain vs wrapped")
    parser.add_argument("--memory", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(memory(args.memory[0], args.memory[1] == "compiled", args.batch, args.size)))
        return
    if args.saved:
        saved = {kind: saved_for_backward(kind, args.batch, args.size) for kind in ("plain", "wrapped")}
        print(f"saved for backward, batch {args.batch}, {args.size}x{args.size}: plain {saved['plain']:.1f} MiB, "
              f"wrapped {saved['wrapped']:.1f} MiB, ratio {saved['wrapped'] / saved['plain']:.4f}")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = timm_exits.flops_report(timm_exits.wrap(timm.create_model("resnet50"), stages=STAGES), input_size=(3, args.size, args.size))
    share = report.all_exits_flops / report.backbone_flops - 1
    print(f"# train step: resnet50 + exits at {STAGES} (linear heads) with ExitEnsembleLoss vs plain resnet50 with CE")
    print(f"# batch {args.batch}, {args.size}x{args.size}, SGD; {torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# heads' share of the FLOPs: {100 * share:.2f} % -> goal: ratio <= {1 + share + 0.05:.3f}")
    print()
    print("| mode | plain step (s) | wrapped step (s) | time ratio | plain peak (MiB) | wrapped peak (MiB) | memory ratio "
          "| plain / wrapped peak RSS (MiB), ratio |")
    print("|---|---|---|---|---|---|---|---|")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    for mode in ["eager"] + ([] if args.no_compile or args.memory_only else ["compiled"]):
        cells = ["–"] * 3
        if not args.memory_only:
            steps = {kind: make_step(kind, mode == "compiled", device) for kind in ("plain", "wrapped")}
            for step in steps.values():
                for _ in range(2):
                    step(x, y)
            times = {kind: [] for kind in steps}
            ratios = []
            for _ in range(args.rounds):
                for kind, step in steps.items():
                    times[kind].append(timed(step, x, y, device))
                ratios.append(times["wrapped"][-1] / times["plain"][-1])
            del steps
            cells = [f"{statistics.median(times['plain']):.3f}", f"{statistics.median(times['wrapped']):.3f}",
                     f"{statistics.median(ratios):.3f}"]
        peaks = {}
        for kind in ("plain", "wrapped"):
            out = subprocess.run([sys.executable, __file__, "--memory", kind, mode, "--batch", str(args.batch), "--size", str(args.size)],
                                 capture_output=True, text=True, check=True)
            peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        for field in ("peak_mib",):
            if all(field in p for p in peaks.values()):
                cells += [f"{peaks['plain'][field]:.0f}", f"{peaks['wrapped'][field]:.0f}",
                          f"{peaks['wrapped'][field] / peaks['plain'][field]:.3f}"]
            else:
                cells += ["–"] * 3
        rss = [p.get("rss_peak_mib") for p in (peaks["plain"], peaks["wrapped"])]
        cells.append(f"{rss[0]:.0f} / {rss[1]:.0f}, {rss[1] / rss[0]:.3f}" if None not in rss else "–")
        print(f"| {mode} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()
