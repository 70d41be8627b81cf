"""What each exit costs in time on the machine at hand, beside what it costs in FLOPs.

FLOPs stand in for time only where every layer runs at the same speed; on a CPU a network's
early, wide layers are memory-bound and take a larger share of the time than of the FLOPs.
`profile_exits` times each segment of the backbone and each exit head on an example batch, in
alternating rounds, so that a speedup can be predicted from measured times: the physical limit of
skipping the rest of the backbone, against which `early_exit`'s measured speedup is judged.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._progress import Progress
from ..fx.modes import evaluating
from ..model import MultiExitModel

__all__ = ["ExitProfile", "HostSyncs", "host_syncs", "profile_exits"]


@dataclasses.dataclass(frozen=True)
class ExitProfile:
    """Median seconds of each segment and head, at one batch size, and of the plain backbone in the same rounds.

    ``seconds[k]`` is what one sample leaving at exit k costs: segments 0..k and heads 0..k (every
    head on the way is computed to decide), per sample, as `timm_exits.runtime.exit_costs` counts FLOPs.
    """

    batch_size: int
    stages: list[str]
    segment_seconds: list[float]
    head_seconds: list[float]
    plain_seconds: float
    device: str
    repeats: int
    input_size: tuple[int, ...] = ()  # one sample's shape, as profiled
    beside_seconds: dict = dataclasses.field(default_factory=dict)  # `beside`'s callables, timed in the same rounds
    # "plain", "segment k", "head k": seconds in each round
    round_seconds: dict[str, list[float]] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    beside_rounds: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # `beside`'s seconds in each round

    @property
    def seconds(self) -> list[float]:
        steps = [s + h for s, h in zip(self.segment_seconds, self.head_seconds)]
        return [t / self.batch_size for t in itertools.accumulate(steps)]

    def predicted_speedup(self, exit_shares: Sequence[float]) -> float:
        """The plain backbone's time over early exit's, predicted from the measured parts when `exit_shares` of the
        samples leave at each exit."""
        shares = [float(s) for s in exit_shares]
        if len(shares) != len(self.stages) or not all(math.isfinite(s) and s >= 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            raise ValueError(
                f"exit_shares must be {len(self.stages)} non-negative shares, one per exit, summing to 1; got {list(exit_shares)}"
            )
        spent = sum(share * cost for share, cost in zip(shares, self.seconds))
        return self.plain_seconds / self.batch_size / spent

    def rounds(self) -> list[ExitProfile]:
        """One profile per timed round, each from that round's seconds alone (its own ``beside_seconds`` too).

        A speedup measured beside the profile and the one predicted, taken round by round and
        then their ratio's median, cancel the machine's drift between rounds as well. A profile
        of one round is its own only round.
        """
        if not self.round_seconds:
            if self.repeats == 1:
                return [self]
            raise ValueError(
                f"this profile of {self.repeats} rounds keeps no round's seconds (profile_exits keeps them; one made by hand does not)"
            )
        n = len(self.segment_seconds)
        return [dataclasses.replace(
            self,
            stages=list(self.stages),
            **_part_fields({name: seconds[r] for name, seconds in self.round_seconds.items()}, n),
            beside_seconds={name: seconds[r] for name, seconds in self.beside_rounds.items()},
            repeats=1,
            round_seconds={},
            beside_rounds={},
        ) for r in range(len(self.round_seconds["plain"]))]


def _part_fields(seconds: dict, n: int) -> dict:
    """An `ExitProfile`'s times of its `n` segments, their heads and the plain backbone, from one number per part name."""
    return {
        "segment_seconds": [seconds[f"segment {k}"] for k in range(n)],
        "head_seconds": [seconds.get(f"head {k}", 0.0) for k in range(n)],  # the last segment has none
        "plain_seconds": seconds["plain"],
    }


def _synchronize(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _timed(fn: Callable, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternating_times(runs: dict, repeats: int, sync: Callable[[], None] = lambda: None, progress: Progress | None = None) -> dict:
    """Seconds of each callable of `runs` in each of `repeats` rounds, every callable timed once per round, after one warm-up round.

    Alternating rounds spread the machine's drift over every callable alike (the project's rule
    for ratios measured in one run); `sync` waits for an accelerator before and after each call.
    `progress` reports the rounds done (the warm-up counts as the first), between the timed calls.
    """
    times: dict = {name: [] for name in runs}
    rounds = range(repeats + 1)
    for round_ in rounds if progress is None else progress(rounds, "timing exits", unit="round"):
        for name, fn in runs.items():
            t = _timed(fn, sync)
            if round_:
                times[name].append(t)
    return times


def alternating_medians(runs: dict, repeats: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Median seconds of each callable of `runs` over `repeats` alternating rounds (see `alternating_times`)."""
    return {name: statistics.median(v) for name, v in alternating_times(runs, repeats, sync).items()}


@torch.no_grad()
def profile_exits(model: MultiExitModel, example_input: torch.Tensor, repeats: int = 10, beside: dict[Any, Callable] | None = None,
                  progress: bool | None = None) -> ExitProfile:
    """Time every segment and exit head of `model` on `example_input`, and the plain backbone beside them.

    Each round runs the plain backbone once, then every segment and head once on the values the
    wrapped model passes it; one warm-up round is not counted, and each part's median over
    `repeats` rounds is kept. The model runs in eval mode and gets its own mode back.

    `beside` names more callables to time in the same rounds (their medians land in
    ``beside_seconds``): a speedup measured there and the one predicted share the machine's
    state, where a measurement taken before or after the profile would not (a shared CPU's speed
    moves by several percent between runs); ``rounds()`` gives each round's profile, for ratios
    taken round by round. They run as the parts do: without gradients and with the model in
    eval mode, so they time inference (a training step beside the profile would not be one).

    `progress` reports the rounds, between the timed calls, as `collect_exit_logits` reports its
    batches: True: a tqdm bar on a terminal, else a line on standard error saying what is timed and
    how many rounds, then the round reached, at most every 10 seconds and at the end; False:
    nothing; None (the default): the bar on a terminal, else those lines through the ``timm_exits``
    logger at INFO. Example::

        >>> profile = timm_exits.profile_exits(
        ...     model, x, beside={"plain": lambda: model.backbone(x), "early exit": lambda: model.early_exit(x, threshold=0.9)})
        >>> result = model.early_exit(x, threshold=0.9)
        >>> measured = profile.beside_seconds["plain"] / profile.beside_seconds["early exit"]
        >>> # the share of the limit reached
        >>> measured / profile.predicted_speedup([c / len(x) for c in result.exit_counts(model.num_exits)])
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"model must be a MultiExitModel (timm_exits.wrap(...)), got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2 or example_input.shape[0] < 1:
        raise ValueError(
            f"example_input must be a batch tensor (B, C, H, W), got {getattr(example_input, 'shape', type(example_input).__name__)}"
        )
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    beside = {} if beside is None else beside
    if not isinstance(beside, dict):
        raise TypeError(f"beside must be a dict of names to callables taking no argument, got {type(beside).__name__}")
    for name, fn in beside.items():
        if not callable(fn):
            raise TypeError(f"beside[{name!r}] must be a callable taking no argument, got {type(fn).__name__}")
    model.check_channels(example_input.shape[1], f"example_input of shape {tuple(example_input.shape)}")
    sync = _synchronize(example_input.device)
    with evaluating(model):
        steps = model.steps()
        if not model.has_segments:
            raise ValueError(
                "this model runs through forward_intermediates (fx could not trace its backbone): "
                "its exits share one pass, so their parts cannot be timed apart"
            )
        parts: dict[str, Callable] = {"plain": lambda: model.backbone(example_input)}
        run = model.run(example_input)
        for output in run:  # each part timed on the values the wrapped model passes it
            k, step, (read, previous, out) = output.index, run.steps[output.index], run.last
            parts[f"segment {k}"] = lambda s=step.segment, c=read: s(*c)
            if step.head is not None:
                parts[f"head {k}"] = lambda st=step, o=out, p=previous: st.logits(o, p)
        report = Progress(progress)
        heads = sum(step.head is not None for step in steps)
        report.note(f"timing the plain {type(model.backbone).__name__}, {len(steps)} segments and {heads} exit head{'s' * (heads != 1)}"
                    + (f", and {len(beside)} callable{'s' * (len(beside) != 1)} beside them" if beside else "")
                    + f", on a batch of {example_input.shape[0]}: {repeats} rounds after one warm-up round")
        runs = {**parts, **{("beside", name): fn for name, fn in beside.items()}}  # keys apart: a "plain" beside is the caller's
        times = alternating_times(runs, repeats, sync, progress=report)
    median = {name: statistics.median(v) for name, v in times.items()}
    n = len(steps)
    return ExitProfile(
        batch_size=int(example_input.shape[0]),
        stages=list(model.stages) + ["final"],
        **_part_fields(median, n),
        device=str(example_input.device),
        repeats=repeats,
        input_size=tuple(int(d) for d in example_input.shape[1:]),
        beside_seconds={name: median[("beside", name)] for name in beside},
        round_seconds={name: times[name] for name in parts},
        beside_rounds={name: times[("beside", name)] for name in beside},
    )


# ops whose result size or value the host must read: on a GPU each makes the host wait for the device
_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
          "aten::unique_consecutive", "aten::equal", "aten::bincount"}  # bincount's length is the input's largest value, read on the host
# `x[i] = k` lifts the number k into a 0-d tensor (lift_fresh), then writes it with one of these (the value's argument
# index): the number travels to the kernel by value, so that lift is no copy from the host
_SCALAR_WRITES = {"aten::index_put_": 2, "aten::index_put": 2, "aten::copy_": 1, "aten::fill_": 1, "aten::masked_fill_": 2}


class HostSyncs(TorchDispatchMode):
    """Counts the ops of a call that make the host wait for the device on a GPU, by name (see `host_syncs`)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self._lifted: torch.Tensor | None = None  # the last 0-d tensor lifted from a Python number, until an op reads it

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if self._lifted is not None and any(a is self._lifted for a in args):
            if name in _SCALAR_WRITES and len(args) > _SCALAR_WRITES[name] and args[_SCALAR_WRITES[name]] is self._lifted:
                self.counts["tensor from host data"] -= 1  # x[i] = k: the number is written by value, not copied
                if not self.counts["tensor from host data"]:
                    del self.counts["tensor from host data"]
            self._lifted = None
        if name in _READS:
            self.counts[name.removeprefix("aten::")] += 1
        elif (name == "aten::repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor)
              and len(args) == 1):
            self.counts["repeat_interleave"] += 1  # the output's size is the repeats' sum
        elif (name in ("aten::index", "aten::index_put", "aten::index_put_")
              and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.counts[f"{name.removeprefix('aten::')} (boolean mask)"] += 1  # a mask's row count is read on the host
        elif name in ("aten::_to_copy", "aten::copy_") and _device_to_host(name, args, kwargs):
            self.counts["copy to host"] += 1
        elif name == "aten::lift_fresh":  # torch.tensor(data) / new_tensor: on a GPU, a blocking copy from the host
            self.counts["tensor from host data"] += 1
            out = func(*args, **kwargs)
            self._lifted = out if out.dim() == 0 else None
            return out
        return func(*args, **kwargs)


def _device_to_host(name: str, args, kwargs) -> bool:
    if name == "aten::copy_":
        dst, src = args[0], args[1]
        return src.device.type not in ("cpu", "meta") and dst.device.type == "cpu" and not (len(args) > 2 and args[2])
    device = kwargs.get("device")
    return (args[0].device.type not in ("cpu", "meta") and device is not None and torch.device(device).type == "cpu"
            and not kwargs.get("non_blocking"))


def host_syncs() -> HostSyncs:
    """Count, in a ``with`` block, the ops that would make the host wait for a GPU.

    Early exit must read on the host how many samples stay at each exit (the next segment's batch
    size), so it waits for the device there; everything else should stay on the device. This
    counts, on any device (a CPU run counts what a GPU run would wait for), each op that reads a
    tensor's value or result size on the host: ``.item()``/``bool()``/``int()`` of a tensor,
    ``nonzero``, ``masked_select``, ``unique``, ``bincount``, boolean-mask indexing, ``repeat_interleave`` without
    ``output_size``, blocking copies from a GPU to the host, and tensors built from host data
    (``torch.tensor(...)``, ``new_tensor``: on a GPU a blocking copy to the device; counted on the
    CPU too, where it is only a risk; ``torch.tensor(k)`` of one number too). A Python number written
    into a tensor (``x[rows] = k``, ``x[i] = k``, ``fill_(k)``) is not counted: torch lifts it into a
    0-d tensor and the write takes it by value. ``tolist()``, ``numpy()`` and ``.cpu()`` of a CPU tensor
    dispatch no op, so a CPU run cannot see a GPU tensor read that way::

        with timm_exits.host_syncs() as syncs:
            timm_exits.early_exit(model, x, threshold=0.9)
        print(syncs.total, dict(syncs.counts))

    On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports the synchronisations CUDA itself sees.
    """
    return HostSyncs()

