"""Where a train step's memory peaks: malloc's bytes in use after every aten op, forward and backward apart.

resnet50 at 224x224, plain (cross entropy) or wrapped (exits after layer1-3, ExitEnsembleLoss),
SGD; two warm-up steps, then one step traced. Prints the peak above the step's start, the op it
came after, and the highest point of the forward and of the backward (CPU, glibc >= 2.33).

    python benchmarks/memory_trace.py plain 32
    python benchmarks/memory_trace.py wrapped 32
"""
from __future__ import annotations

import sys

import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import timm_exits
from common import malloc_in_use


class Trace(TorchDispatchMode):
    def __init__(self, in_use):
        super().__init__()
        self.in_use, self.points = in_use, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.points.append((str(func), self.in_use()))
        return out


def main() -> None:
    kind, batch = sys.argv[1], int(sys.argv[2])
    in_use = malloc_in_use()
    if in_use is None:
        raise SystemExit("needs glibc >= 2.33 (mallinfo2)")
    torch.manual_seed(0)
    backbone = timm.create_model("resnet50", num_classes=1000)
    if kind == "plain":
        model, loss_fn = backbone, nn.CrossEntropyLoss()
    else:
        model, loss_fn = timm_exits.wrap(backbone, stages=[1, 2, 3]), timm_exits.ExitEnsembleLoss()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    for _ in range(2):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    base = in_use()
    with Trace(in_use) as trace:
        loss = loss_fn(model(x), y)
        forward = len(trace.points)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    mib = [(op, (b - base) / 2**20) for op, b in trace.points]
    at = max(range(len(mib)), key=lambda i: mib[i][1])
    print(f"{kind}, batch {batch}: peak {mib[at][1]:.1f} MiB above the step's start, after op {at + 1} of {len(mib)} ({mib[at][0]}); "
          f"the forward ends at op {forward}; highest point of the forward {max(b for _, b in mib[:forward]):.1f} MiB, "
          f"of the backward and the optimizer step {max(b for _, b in mib[forward:]):.1f} MiB")


if __name__ == "__main__":
    main()
