"""Compiled early exit: every step's segment and head through `torch.compile` on its own.

Early exit runs each later segment on a smaller batch, a different size at every call. Compiled
as one piece, the model could not stop between exits; compiled with static shapes, every new
size would be a new graph. `compile_exits` compiles each eval step's segment and head as its own
function, and torch's automatic dynamic shapes make the batch dimension dynamic at the first
size change. After a warm-up at a batch of 1 (always specialised), one of 2 to 15 and one of 16
or more (CPU convolution picks its path by batch size, and the graphs follow), no batch size from
1 to 64 compiles again: `tests/runtime/test_compiled.py` counts the graphs. Pass ``dynamic=False`` and
every size is a graph of its own.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..model import MultiExitModel

__all__ = ["compile_exits"]


class CompiledPart(nn.Module):
    """A segment or head, compiled on its own.

    ``compiled_from`` is the part itself (its weights are shared, not copied: FLOPs are counted on
    it); ``cascaded`` is passed through, so a compiled cascaded head still reads the previous
    exit's logits.
    """

    def __init__(self, module: nn.Module, **compile_kwargs):
        super().__init__()
        self.compiled_from = module
        self.compile_kwargs = compile_kwargs
        self.compiled = torch.compile(module, **compile_kwargs)

    @property
    def cascaded(self) -> bool:
        return bool(getattr(self.compiled_from, "cascaded", False))

    def forward(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)


def _settings(compile_kwargs: dict) -> dict:
    """`compile_kwargs` with torch.compile's defaults filled in: ``{}`` and ``{"backend": "inductor"}`` are one setting."""
    try:
        bound = inspect.signature(torch.compile).bind(None, **compile_kwargs)
    except TypeError:
        return compile_kwargs  # an argument torch.compile does not take: torch.compile itself names it
    bound.apply_defaults()
    return dict(bound.arguments)


def compile_exits(model: MultiExitModel, **compile_kwargs) -> MultiExitModel:
    """Compile each eval-mode step of `model` (segment and head) for early exit; returns `model`.

    The steps are compiled in place: ``model.early_exit`` (and every other eval-mode pass) then
    runs them. ``compile_kwargs`` go to `torch.compile` (``backend``, ``mode``, ...). Replacing a
    head or resetting the classifier rebuilds the steps uncompiled: compile again after it.
    Where the backbone traces alike in both modes the training steps are the same objects, and
    run compiled too.

    Example::

        >>> model = timm_exits.compile_exits(model.eval())
        >>> for n in (1, 8, 64):                                # warm-up: the graphs of every size class
        ...     model.forward_exits(images[:n])
        >>> result = model.early_exit(images, threshold=0.9)   # shrinking batches, no new graph
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"model must be a MultiExitModel (timm_exits.wrap(...)), got {type(model).__name__}")
    steps = model.steps(training=False)
    if not model.has_segments:
        raise ValueError(
            "this model runs through forward_intermediates (fx could not trace its backbone): "
            "it has no segments to compile one by one; compile the whole model instead"
        )
    done = [part for step in steps for part in (step.segment, step.head) if isinstance(part, CompiledPart)]
    if done:
        if all(_settings(part.compile_kwargs) == _settings(compile_kwargs) for part in done):
            return model  # compiled already, with these settings (torch.compile's defaults filled in on both sides)
        first, now = done[0].compile_kwargs or "torch.compile defaults", compile_kwargs or "torch.compile defaults"
        raise ValueError(
            f"this model's steps are already compiled with {first}; they cannot be compiled again with {now}. Compile a copy made "
            "before the first compile_exits (copy.deepcopy of a compiled model rebuilds its steps uncompiled: "
            "compile_exits(copy.deepcopy(model), ...))"
        )

    # all built first: a bad argument leaves the model as it was
    model.replace_step_parts(lambda part: CompiledPart(part, **compile_kwargs))
    return model
