"""Switching a model's training mode for one call, and putting every submodule's own flag back after it."""
from __future__ import annotations

import contextlib
import threading

from torch import nn

__all__ = ["evaluating", "set_training"]


def set_training(model: nn.Module, modes: dict[nn.Module, bool] | bool) -> dict[nn.Module, bool]:
    """Set every submodule's training flag (one bool, or the dict this returned); return the old flags."""
    old = {m: m.training for m in model.modules()}
    for m in model.modules():  # parents first, so each module ends with its own flag
        mode = modes if isinstance(modes, bool) else modes[m]
        if m.training != mode or any(c.training != mode for c in m.children()):
            m.train(mode)  # through train(): some models drop caches there (efficientformer)
    return old


# One lock for every call that puts a model in eval mode for a while: taking turns, no call records
# another's temporary flags as the user's. Reentrant: such a call may make another.
_MODES = threading.RLock()


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """`model` in eval mode for the block; every submodule gets its own flag back after it, also on failure."""
    with _MODES:
        old = set_training(model, False)
        try:
            yield
        finally:
            set_training(model, old)
