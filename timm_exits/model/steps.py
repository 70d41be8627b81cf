"""The steps of a wrapped model and the one loop over them.

Step k runs segment k of the backbone on the values carried from step k-1 and exit head k on
its output (`ExitStep`: ``split``, ``logits``, ``onward``). `ExitRun` is the loop: every way of
running the model (forward, early exit, the stream, FLOPs, profiles, export, drawings) iterates
it or calls the step methods it calls. A backbone fx cannot trace runs through timm's
``forward_intermediates``: the same protocol, other segments (`build_steps`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..fx.surgery import ExitPlan

__all__ = ["ExitStep", "ExitRun", "ExitOutput", "StepParts", "build_steps", "main_output"]


class ExitOutput(NamedTuple):
    """One exit's output in a run: its index (from 0, like ``model(x)[index]``), logits and pooled feature.

    ``feature`` is None unless the run was asked for features; the last exit's is the backbone's
    pre-logits feature (None when `wrap` could not find it in the graph).
    """

    index: int
    logits: torch.Tensor
    feature: torch.Tensor | None


class StepParts(NamedTuple):
    """What the step an `ExitRun` just ran read and computed, for callers that look inside a step (profiles, drawings).

    ``read``: the segment's inputs; ``previous``: the previous exit's logits its head read (a
    cascade; else None); ``out``: the segment's output, which the head reads (the backbone's
    output, for the last step).
    """

    read: tuple
    previous: torch.Tensor | None
    out: object


def _bind(graph: fx.Graph, backbone: nn.Module, whole: bool = True) -> fx.GraphModule:
    """A GraphModule for `graph` that reads the live backbone's modules.

    ``whole``: the only child is the backbone itself, so the segment's code reads
    ``self.backbone.<path>`` at every call and always sees the backbone's current modules,
    parameters and buffers (after ``.to()``, ``load_state_dict``, ``deepcopy``). Otherwise fx
    rebuilds just the module paths the graph uses (sharing the modules), so that an exported
    segment carries only its own weights.
    """
    holder = nn.Module()
    holder.backbone = backbone
    gm = fx.GraphModule(holder, graph, class_name="Segment")
    if whole:
        gm.backbone = backbone  # replace the partial copy of the hierarchy fx made by the real one
    return gm


class ExitStep(nn.Module):
    """Step k of a wrapped model: segment k of the backbone, then exit head k.

    ``segment(*carried)`` returns ``(feature, carried for step k+1)``; the last step's returns the
    backbone's output and its pre-logits feature (or None). Called as a module, a step returns
    ``(logits, *carried for step k+1)`` (the last: the logits alone), the form an exit-by-exit
    runtime runs and `timm_exits.export_exits` exports.

    In a cascade (``wrap(..., cascade=True)``) a head also reads the previous exit's logits: the
    step before it carries its logits on, last (``passes_on``), and this step takes them off
    before its segment runs (``cascaded``), so that every runtime which carries values from step
    to step, early exit's row selection among them, carries those logits too.

    ``standalone`` is None when each step computes only its own segment, so that leaving at
    step k skips the rest (``skips``). A backbone fx could not trace runs through timm's
    ``forward_intermediates``, which computes every exit's feature in the first step; there
    ``standalone`` is the backbone from the input to this step's output alone, for counting what
    an exit would cost.
    """

    def __init__(self, segment: nn.Module, head: nn.Module | None, stage: str = "", standalone: nn.Module | None = None,
                 passes_on: bool = False):
        super().__init__()
        self.segment = segment
        self.head = head
        self.stage = stage
        self.standalone = standalone
        self.passes_on = passes_on

    @property
    def skips(self) -> bool:
        """Whether leaving at this step skips the backbone's later work."""
        return self.standalone is None

    @property
    def cascaded(self) -> bool:
        """Whether this step's head also reads the previous exit's logits (carried last into this step)."""
        return bool(getattr(self.head, "cascaded", False))

    def split(self, carried: tuple) -> tuple[tuple, torch.Tensor | None]:
        """What the segment reads, and the previous exit's logits for a cascaded head (else None)."""
        return (tuple(carried[:-1]), carried[-1]) if self.cascaded else (tuple(carried), None)

    def logits(self, out, previous: torch.Tensor | None, return_features: bool = False):
        """The head on the segment's output (and on the previous exit's logits, in a cascade)."""
        extra = {"return_features": True} if return_features else {}
        try:
            return self.head(out, previous, **extra) if self.cascaded else self.head(out, **extra)
        except ValueError as err:  # torch's words name neither the head nor the fix
            if "Expected more than 1 value per channel when training" not in str(err):
                raise
            raise ValueError(
                f"the {type(self.head).__name__} after {self.stage!r} normalises over the batch (BatchNorm) in training, and this "
                f"batch gives it one value per channel ({err}): train with batches of 2 or more, or a head without BatchNorm "
                "(head='linear')") from None

    def onward(self, carried, logits: torch.Tensor) -> tuple:
        """What the next step reads: the segment's carried values, then these logits when the next head is cascaded."""
        return (*carried, logits) if self.passes_on else tuple(carried)

    def uncompiled(self) -> ExitStep:
        """This step with parts `timm_exits.compile_exits` compiled replaced by the modules they compile (for counting)."""
        segment, head = (getattr(part, "compiled_from", part) for part in (self.segment, self.head))
        if segment is self.segment and head is self.head:
            return self
        return ExitStep(segment, head, self.stage, self.standalone, self.passes_on)

    def run(self, carried: tuple) -> tuple[torch.Tensor, tuple]:
        """This exit's logits from what the step reads, and what the next step reads (nothing after the last exit)."""
        read, previous = self.split(carried)
        out, carried = self.segment(*read)
        if self.head is None:
            return main_output(out), ()
        z = self.logits(out, previous)
        return z, self.onward(carried, z)

    def forward(self, *carried):
        z, onward = self.run(carried)
        return z if self.head is None else (z, *onward)


def main_output(out):
    # auxiliary outputs some backbones add in training (inception's aux logits): keep the main one
    return out if isinstance(out, torch.Tensor) else out[0]


class ExitRun:
    """One pass of a wrapped model, one exit at a time: iterating yields each exit's `ExitOutput`, shallow to deep.

    Between two items, ``carried`` holds the values the next step reads (the input before the
    first). A caller that stops computing some samples, as early exit does, replaces it with
    those samples' rows; the next steps then run on the smaller batch. ``last`` holds the
    `StepParts` of the step just run, for callers that time or draw each part.
    """

    def __init__(self, steps: list[ExitStep], x, features: bool = False, checkpointed: bool = False, num_classes: int | None = None):
        self.steps = steps
        self.carried: tuple = (x,)
        self.features = features
        self.checkpointed = checkpointed
        self.num_classes = num_classes
        self.last: StepParts | None = None

    def _segment(self, step: ExitStep, carried: tuple):
        if self.checkpointed:
            segment = getattr(step.segment, "compiled_from", step.segment)  # compile_exits' parts: checkpoint the graph itself
            if isinstance(segment, fx.GraphModule):
                return checkpoint(segment, *carried, use_reentrant=False)
        return step.segment(*carried)

    def __iter__(self):
        for k, step in enumerate(self.steps):
            # the last step's parts go before this segment runs: a caller that kept some rows (early exit) frees the rest
            self.last = out = carried = None
            read, previous = step.split(self.carried)
            out, carried = self._segment(step, read)
            self.last = StepParts(read, previous, out)
            read = None
            if step.head is None:  # the backbone's own head: carried is its pre-logits feature
                self.carried = ()
                logits = main_output(out)
                if self.num_classes is not None and logits.shape[-1] != self.num_classes:
                    raise RuntimeError(
                        f"the backbone's head now outputs {logits.shape[-1]} classes, the exits {self.num_classes}: its classifier was "
                        f"changed after wrap(); call reset_classifier({logits.shape[-1]}) on the wrapped model, which resets every exit, "
                        "or wrap the backbone again"
                    )
                yield ExitOutput(k, logits, carried if self.features else None)
                return
            if self.features:
                try:
                    z, feature = step.logits(out, previous, return_features=True)
                except TypeError as err:  # looked at only on failure: the training step's hot path stays as it was
                    if "return_features" not in str(err):
                        raise
                    raise TypeError(
                        f"the head of exit {k + 1} ({type(step.head).__name__}) takes no return_features: a feature term needs heads whose "
                        "forward(x, return_features=True) also returns the pooled feature its classifier read (the built-in heads do)"
                    ) from err
            else:
                z, feature = step.logits(out, previous), None
            self.carried = step.onward(carried, z)
            yield ExitOutput(k, z, feature)


class _Intermediates(nn.Module):
    """First step of a backbone fx could not trace: timm's forward_intermediates computes every exit's feature."""

    def __init__(self, backbone: nn.Module, indices: list[int]):
        super().__init__()
        self.backbone = backbone
        self.indices = list(indices)

    def forward(self, x):
        final, feats = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=False)
        return feats[0], (*feats[1:], final)


class _Handed(nn.Module):
    """A later step of such a backbone: its feature was computed by the first step; hand it out, carry the rest."""

    def forward(self, *carried):
        return carried[0], carried[1:]


class _OwnHead(nn.Module):
    """The last step of such a backbone: its own head on the final feature map."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, final):
        return self.backbone.forward_head(final), self.backbone.forward_head(final, pre_logits=True)


class _UpTo(nn.Module):
    """The backbone from the input to one intermediate feature, stopping there."""

    def __init__(self, backbone: nn.Module, index: int):
        super().__init__()
        self.backbone = backbone
        self.index = index

    def forward(self, x):
        return self.backbone.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)[0]


def build_steps(backbone: nn.Module, plan: ExitPlan, exits: list[nn.Module], stages: list[str],
                whole: bool = True) -> tuple[list[ExitStep], list[ExitStep]]:
    """The training and the eval steps of `backbone` cut as `plan` says, with `exits` for heads (the same list twice
    when both modes trace alike).

    ``whole``: each segment reads the live backbone (see `_bind`); otherwise it holds only the modules it calls.
    """
    heads, stages = list(exits) + [None], stages + ["final"]
    if getattr(heads[0], "cascaded", False):
        raise ValueError(
            f"the head of exit 1 ({type(heads[0]).__name__}) is cascaded, "
            "but there is no exit before it to read: cascade the heads after the first"
        )
    passes = [bool(getattr(h, "cascaded", False)) for h in heads[1:]] + [False]  # step k carries its logits on to a cascaded head k+1
    indices = plan.feature_indices
    if indices is not None:  # fx could not trace it: timm's own API computes every feature at once
        segments = [_Intermediates(backbone, indices)] + [_Handed() for _ in indices[1:]] + [_OwnHead(backbone)]
        alone = [_UpTo(backbone, i) for i in indices] + [backbone]
        steps = [ExitStep(s, h, n, a, p) for s, h, n, a, p in zip(segments, heads, stages, alone, passes)]
        return steps, steps

    def build(graphs):
        return [ExitStep(_bind(g, backbone, whole), h, n, passes_on=p) for g, h, n, p in zip(graphs, heads, stages, passes)]

    eval_steps = build(plan.eval_segments)
    code = [[g.python_code("self").src for g in gs] for gs in (plan.train_segments, plan.eval_segments)]
    if code[0] == code[1]:  # most models trace alike in both modes: then one set of steps serves both
        return eval_steps, eval_steps
    return build(plan.train_segments), eval_steps
