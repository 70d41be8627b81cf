"""Host synchronisations per call: how often the host waits for the device, counted op by op.

On a GPU every op that reads a tensor's value or result size on the host (``.item()``,
``nonzero``, a boolean mask, a blocking copy to the host) makes the host wait until the device has
caught up, which leaves the GPU idle while the next kernels are prepared. `timm_exits.host_syncs`
counts those ops; the counts do not depend on the device, so this CPU run gives what a GPU run
would wait for. Where CUDA is available, ``torch.cuda.set_sync_debug_mode("warn")`` cross-checks
the counts with the synchronisations CUDA itself sees.

For each model: the wrapped forward, `early_exit` (thresholds at each exit's median confidence, so
that every exit decides) at batch 1 and 64, `early_exit_stream` over four batches of 64, and a
training step of `MultiExitTask` with each loss.

    python benchmarks/syncs.py [--size 224]
"""
from __future__ import annotations

import argparse
import contextlib
import warnings

import timm
import torch

import timm_exits
from common import cpu_name
from timm_exits.runtime import exit_confidence

MODELS = {
    "resnet50": (lambda: timm.create_model("resnet50", num_classes=10), [1, 2, 3]),
    "vit_small_patch16_224": (lambda: timm.create_model("vit_small_patch16_224", num_classes=10), [3, 6, 9]),
}


@contextlib.contextmanager
def counted(device: torch.device):
    """`host_syncs`, and on CUDA the synchronisations CUDA reports beside it."""
    with timm_exits.host_syncs() as syncs, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
    syncs.cuda = sum("synchronizing" in str(w.message) for w in caught) if device.type == "cuda" else None


def row(call: str, syncs, note: str = "") -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(syncs.counts.items())) or "none"
    cuda = "" if syncs.cuda is None else f" | {syncs.cuda}"
    return f"| {call} | {syncs.total} | {kinds}{cuda} | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"Machine: {where}; torch {torch.__version__}, timm {timm.__version__}.")
    print(f"Command: `python benchmarks/syncs.py --size {args.size}`\n")
    cuda_column = " | CUDA's own count" if device.type == "cuda" else ""
    for name, (build, stages) in MODELS.items():
        torch.manual_seed(0)
        size = (3, args.size, args.size)
        backbone = build()
        if "vit" in name:
            backbone = timm.create_model(name, num_classes=10, img_size=args.size)
        model = timm_exits.wrap(backbone, stages=stages, input_size=size).to(device).eval()
        x = torch.randn(64, *size, device=device)
        with torch.no_grad():
            median = [exit_confidence(z).median().item() for z in model(x)[:-1]]
        warnings.filterwarnings("ignore")
        timm_exits.early_exit(model, x, threshold=median)  # learn the batch layout and the costs first
        print(f"**{name}** at {args.size}x{args.size}, exits after {list(model.stages)}\n")
        print(f"| call | host reads | which{cuda_column} | note |")
        print("|---|---:|---|---|" + ("---:|" if cuda_column else ""))
        with counted(device) as syncs, torch.no_grad():
            model(x)
        print(row("forward, batch 64 (eval)", syncs))
        for batch in (1, 64):
            with counted(device) as syncs:
                result = timm_exits.early_exit(model, x[:batch], threshold=median)
            reached = min(model.num_exits - 1, int(result.exit_index.max()) + 1)
            print(row(f"early_exit, batch {batch}", syncs, f"early exits decided at: {reached}"))
        with counted(device) as syncs:
            timm_exits.early_exit_stream(model, [x] * 4, threshold=median)
        print(row("early_exit_stream, 4 batches of 64", syncs, "one read per segment run with a head"))
        model.train()
        y = torch.randint(0, 10, (64,), device=device)
        for loss in timm_exits.loss_names():
            if loss == "ekd":
                continue  # its teachers are models of the user's: not ours to count
            kwargs = {"epochs": 10} if loss in ("sdn", "msd") else None
            task = timm_exits.MultiExitTask(model, loss, criterion_kwargs=kwargs, verbose=False).to(device)
            task(x[:8], y[:8])["loss"].backward()  # warm-up
            with counted(device) as syncs:
                task(x[:8], y[:8])["loss"].backward()
            note = "the target's range check" if syncs.counts.get("_local_scalar_dense") == 1 else ""
            print(row(f"train step, {loss} (batch 8)", syncs, note))
        print()


if __name__ == "__main__":
    main()
