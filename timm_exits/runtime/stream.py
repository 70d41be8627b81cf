"""Early exit over a stream of batches, every segment kept at full batches.

Within one batch, early exit runs each later segment on the samples still there: fewer at every
exit, and on a CPU or GPU a segment costs more per image at a small batch than at a full one. On
the demo's model at batch 64 that rate, not the bookkeeping, is most of the gap between measured
and time-predicted speedup (`docs/benchmarks.md`). Over a stream (a validation set, a queue of
requests) the samples that stay from one batch can wait for those of the next: `early_exit_stream`
keeps a queue before every segment and runs a segment only on a full batch, except for the last
partial ones when the stream ends. Each sample's decision is the one `early_exit` makes; only the
grouping of samples into batches differs.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..model import MultiExitModel
from .criteria import calibration_temperature, check_criterion, check_logit_count, confidence_thresholds, exit_confidence, passes_nobody
from .early_exit import EarlyExitResult
from .rows import batch_kinds, exit_costs_on, split_rows, take_rows

__all__ = ["early_exit_stream"]


def _concat(parts: list, kind, n: int):
    """Carried values of several groups of samples as one group of `n` (the inverse of `_take`)."""
    if len(parts) == 1:
        return parts[0]
    if kind == "batch":
        return torch.cat(parts)
    if kind == "size":
        return n
    if isinstance(kind, tuple):
        return type(parts[0])(_concat([p[i] for p in parts], k, n) for i, k in enumerate(kind))
    return parts[0]  # the same for every batch of this input size


class _Queue:
    """Samples waiting before one step: their positions in the stream and what the step reads."""

    def __init__(self, kind):
        self.kind = kind
        self.groups: list[tuple[torch.Tensor, tuple]] = []
        self.size = 0

    def push(self, ids: torch.Tensor, carried: tuple) -> None:
        self.groups.append((ids, carried))
        self.size += len(ids)

    def pop(self, n: int) -> tuple[torch.Tensor, tuple]:
        ids, parts, wanted = [], [], n
        while wanted:
            group_ids, carried = self.groups[0]
            if len(group_ids) <= wanted:
                self.groups.pop(0)
                ids.append(group_ids)
                parts.append(carried)
                wanted -= len(group_ids)
            else:
                rows = torch.arange(len(group_ids), device=group_ids.device)
                ids.append(group_ids[:wanted])
                parts.append(take_rows(carried, self.kind, rows[:wanted]))
                self.groups[0] = (group_ids[wanted:], take_rows(carried, self.kind, rows[wanted:]))
                wanted = 0
        self.size -= n
        return torch.cat(ids), _concat(parts, self.kind, n)


@torch.no_grad()
def early_exit_stream(model: MultiExitModel, batches: Iterable[torch.Tensor], threshold=0.9, criterion="max_prob", temperature=None,
                      batch_size: int | None = None) -> EarlyExitResult:
    """`early_exit` over every batch of `batches`, each segment run on full batches of `batch_size`.

    Args:
        model: a `MultiExitModel` in eval mode whose backbone fx could trace.
        batches: input tensors of one sample shape (a loader's images, without labels).
        threshold, criterion, temperature: as `early_exit` takes them (a `Calibration` too); the
            ensembles and patience, which read a sample's earlier exits, are for `early_exit`.
        batch_size: the batch every segment waits for; the first input batch's size by default.

    Returns one `EarlyExitResult` for all the samples, in the order they came.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"early_exit_stream needs a MultiExitModel (timm_exits.wrap(...)), got {type(model).__name__}")
    if model.training:
        raise RuntimeError("early_exit_stream runs in eval mode (batch norm statistics, dropout); call model.eval() first")
    if criterion == "patience":
        raise ValueError("criterion='patience' reads each sample's earlier exits: use model.early_exit for it")
    check_criterion(criterion)
    check_logit_count(model, criterion)
    if getattr(threshold, "ensemble", False):
        raise ValueError(
            "the calibration was made with ensemble=True: early_exit_stream decides on each exit's own logits; "
            "use model.early_exit(..., ensemble=True) for it, or calibrate without the ensemble"
        )
    if isinstance(batches, torch.Tensor) and batches.dim() == len(model.input_size) + 1:  # one batch (a stack of batches is fine)
        raise TypeError("batches must be an iterable of input batches (a DataLoader's images, a list of tensors), "
                        f"got one tensor of shape {tuple(batches.shape)}: pass [x], or call model.early_exit(x)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    steps = model.steps()
    if not model.has_segments:
        raise ValueError(
            "this model runs through forward_intermediates (fx could not trace its backbone): "
            "its exits share one pass, so there is nothing to queue; use model.early_exit"
        )
    temperatures = calibration_temperature(threshold, temperature, model.num_exits)
    thresholds = confidence_thresholds(threshold, criterion, model.num_exits, False)
    queues: list[_Queue] = []
    done: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (positions, logits, exit)
    seen, shape, spent, dtype = 0, None, None, None

    def run(k: int, ids: torch.Tensor, carried: tuple) -> None:
        nonlocal dtype
        step = steps[k]
        z, after = step.run(carried)
        dtype = dtype or z.dtype  # the result's dtype: the first exit's (every sample reaches it first), as in early_exit
        if step.head is None:  # kept until the stream ends, so a copy: a compiled step's output buffer is reused by its next call
            done.append((ids, z / temperatures[k] if temperatures is not None else z.clone(), k))
            return
        if temperatures is not None:
            z = z / temperatures[k]
        if passes_nobody(thresholds[k], criterion):
            queues[k + 1].push(ids, after)  # everyone stays: no confidence to compute, nothing to read on the host
            return
        passed = exit_confidence(z, criterion) >= thresholds[k]
        count = int(passed.sum())  # the one host read at this exit: how many leave
        if count == 0:
            queues[k + 1].push(ids, after)
            return
        leaving, staying = split_rows(passed, count)
        done.append((ids[leaving], z[leaving], k))
        if staying.numel():
            queues[k + 1].push(ids[staying], take_rows(after, queues[k + 1].kind, staying))

    for x in batches:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"each batch must be a tensor (B, ...), got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[0] == 0:
            continue
        if shape is None:
            model.check_channels(x.shape[1], f"a batch of shape {tuple(x.shape)}")
            shape, batch_size = tuple(x.shape[1:]), batch_size or x.shape[0]
            kinds = batch_kinds(model, x)
            queues = [_Queue(("batch",))] + [_Queue(kind) for kind in kinds]
            spent = exit_costs_on(model, shape, x.device)
        elif tuple(x.shape[1:]) != shape:
            raise ValueError(f"every batch must have one sample shape: the first had {shape}, this one {tuple(x.shape[1:])}")
        queues[0].push(torch.arange(seen, seen + x.shape[0], device=x.device), (x,))
        seen += x.shape[0]
        for k, queue in enumerate(queues):
            while queue.size >= batch_size:
                run(k, *queue.pop(batch_size))
    if shape is None:
        raise ValueError("batches is empty (or every batch in it is): there is nothing to classify")
    for k, queue in enumerate(queues):  # the stream has ended: the last partial batches, shallow to deep
        while queue.size:
            run(k, *queue.pop(min(batch_size, queue.size)))
    logits = done[0][1].new_empty(seen, done[0][1].shape[1], dtype=dtype)
    exit_index = torch.empty(seen, dtype=torch.long, device=logits.device)
    for positions, z, k in done:
        logits[positions] = z.to(dtype)
        exit_index[positions] = k
    return EarlyExitResult(logits, exit_index, spent[exit_index])
