"""The row mechanics of early exit, shared by `early_exit` and the stream, and what they learn about a model once.

After an exit, the samples that leave are split from those that stay (`split_rows`, given the one
count read on the host), and the values carried to the next step keep only the staying rows (`take_rows`), for the
parts that follow the batch (`batch_kinds`, learned on batches of 2 and 3). What leaving at each
exit costs (`exit_costs`) is counted once per input size. Both facts live in one object per
model, weakly keyed, with a lock, and are dropped when the model's steps change.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import torch

from ..cost.flops import InputSizeError, flops_report
from ..model import MultiExitModel

__all__ = ["split_rows", "take_rows", "batch_kinds", "exit_costs", "exit_costs_on"]


def _slot_kinds(a, b, na: int, nb: int):
    """Compare a carried value at batch sizes `na` and `nb`: which parts follow the batch."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() == 0 or a.shape[1:] != b.shape[1:]:
            return "same" if a.shape == b.shape else "mixed"
        if a.shape[0] == na and b.shape[0] == nb:
            return "batch"
        return "same" if a.shape[0] == b.shape[0] else "mixed"
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        return "size" if (a, b) == (na, nb) else "same"
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return tuple(_slot_kinds(x, y, na, nb) for x, y in zip(a, b))
    return "same"


def split_rows(passed: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows where `passed` holds and those where it does not, each in order; `count` of them pass.

    How many leave must be known on the host (it sizes the next segment's batch): the caller has
    read it, its one host read at this exit, and skips an exit nobody leaves. A stable sort puts
    the passing rows first, so neither list needs a ``nonzero`` of its own (on a GPU, each is a
    wait for the device).
    """
    if count == passed.numel():
        rows = torch.arange(count, device=passed.device)
        return rows, rows[:0]
    order = torch.argsort(passed.logical_not().to(torch.uint8), stable=True)
    return order[:count], order[count:]


def take_rows(value, kind, rows: torch.Tensor):
    """The rows `rows` of a carried value whose batch parts are described by `kind`."""
    if kind == "batch":
        if value.dim() == 4 and not value.is_contiguous() and value.is_contiguous(memory_format=torch.channels_last):
            return value[rows]  # keeps channels_last, where index_select would hand the next segment a contiguous copy to convert back
        return value.index_select(0, rows)
    if kind == "size":
        return int(rows.numel())
    if isinstance(kind, tuple):
        return type(value)(take_rows(v, k, rows) for v, k in zip(value, kind))
    return value


def _contains_mixed(kind) -> bool:
    return kind == "mixed" or (isinstance(kind, tuple) and any(_contains_mixed(k) for k in kind))


class _Learned:
    """What early exit learns about one model, once: which carried values follow the batch, and what
    leaving at each exit costs for each input size.

    One per model, weakly keyed: it lives as long as the model and is never pickled or copied with
    it (a copy learns again). It is dropped when the model's steps change (a head or the backbone
    replaced). Its lock makes concurrent first calls learn each fact once.
    """

    def __init__(self, steps: list):
        self.steps = steps  # the eval steps it was learned on
        self.lock = threading.Lock()
        self.kinds: list | None = None
        self.costs: dict[tuple[int, ...], list[float]] = {}
        self.on_device: dict[tuple, torch.Tensor] = {}  # the costs as a tensor, per input size and device


_LEARNED: weakref.WeakKeyDictionary[MultiExitModel, _Learned] = weakref.WeakKeyDictionary()


_LEARNED_LOCK = threading.Lock()


def _learned(model: MultiExitModel) -> _Learned:
    steps = model.steps(training=False)
    with _LEARNED_LOCK:
        learned = _LEARNED.get(model)
        if learned is None or learned.steps is not steps:
            learned = _LEARNED[model] = _Learned(steps)
        return learned


def batch_kinds(model: MultiExitModel, x: torch.Tensor) -> list:
    """For each cut, which carried values follow the batch (learned once per model on batches of 2 and 3)."""
    learned = _learned(model)
    with learned.lock:
        if learned.kinds is None:
            runs = []
            for n in (2, 3):
                run = model.run(x[:1].expand(n, *x.shape[1:]).clone())
                runs.append([run.carried for _ in run][:-1])  # what each early exit carries on
            kinds = [_slot_kinds(a, b, 2, 3) for a, b in zip(*runs)]
            for k, kind in enumerate(kinds):
                if _contains_mixed(kind):
                    raise ValueError(
                        f"early_exit cannot split the batch after exit {k + 1} ({model.stages[k]!r}): "
                        "a value carried past it mixes the batch with another dimension; choose another stage"
                    )
            learned.kinds = kinds
        return learned.kinds


def exit_costs(model: MultiExitModel, input_size: tuple[int, ...]) -> list[float]:
    """What a sample that leaves at exit k costs: the backbone up to k plus heads 0..k (learned once per input size)."""
    learned = _learned(model)
    with learned.lock:
        if input_size not in learned.costs:
            try:
                with torch.inference_mode(False):
                    exits = flops_report(model, input_size=input_size).exits
            except InputSizeError as err:  # the caller's batch does not fit the model: the model's own message, as its forward gives it
                raise err.failure from None
            heads = itertools.accumulate(cost.head_flops for cost in exits)
            learned.costs[input_size] = [float(cost.backbone_flops + h) for cost, h in zip(exits, heads)]
        return learned.costs[input_size]


def exit_costs_on(model: MultiExitModel, input_size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`exit_costs` as a tensor on `device`, made once: a tensor built from host data is a copy, and on a GPU a wait, per call."""
    learned = _learned(model)
    key = (input_size, str(device))
    if key not in learned.on_device:  # after the first call, a dict look-up and nothing else
        costs = torch.tensor(exit_costs(model, input_size), device=device)
        with learned.lock:
            learned.on_device.setdefault(key, costs)
    return learned.on_device[key]
