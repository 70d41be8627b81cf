"""The head registry: heads are chosen by name (``head="sdn"``), like timm's ``create_act_layer``.

A head is built from the feature it reads (channels, layout) and the number of classes; any
callable ``(channels, num_classes, layout) -> nn.Module`` works too. `check_head` runs a new head
once on the feature it will read, so that a wrong one fails at `wrap`, naming the exit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..fx.modes import set_training
from ..fx.surgery import ExitSite

__all__ = ["register_head", "create_head", "check_head", "head_names"]


_HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str, *, override: bool = False):
    """Class decorator: make a head available as ``wrap(..., head=name)``.

    The class is built with ``cls.from_site(site, num_classes, **head_kwargs)`` when it has that
    classmethod, else with ``cls(channels, num_classes, layout, **head_kwargs)``. A name that is
    taken (the built-ins among them) is replaced only with ``override=True``: replacing it changes
    every later ``wrap(..., head=name)`` in the process.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_head needs a non-empty head name, got {name!r}")
    if name in _HEADS and not override:
        raise ValueError(
            f"a head named {name!r} is already registered ({_HEADS[name].__name__}); "
            f"pass register_head({name!r}, override=True) to replace it everywhere, or choose another name"
        )

    def add(cls):
        _HEADS[name] = cls
        return cls

    return add


def check_head(module: nn.Module, site: ExitSite, num_classes: int, which: str) -> None:
    """Run a new head on a feature shaped like the one it will read; raise unless it gives ``(B, num_classes)`` logits.

    A batch of two, so that a head which mixes the samples is caught too. The head's modes are
    put back as they were.
    """
    ref = next(module.parameters(), None)
    x = torch.randn(2, *site.shape[1:], device=ref.device if ref is not None else None,
                    dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
    modes = set_training(module, False)
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as err:  # whatever a user's head raises, the message says which head and on what
        raise ValueError(
            f"{which} cannot read its feature: on a {tuple(x.shape)} feature ({site.layout.format}) it raised {type(err).__name__}: {err}. "
            "A head takes the stage's feature as it is and pools it itself (see timm_exits.heads.FeaturePool)"
        ) from err
    finally:
        set_training(module, modes)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise ValueError(f"{which} must return logits of shape (B, num_classes) = (2, {num_classes}) on a batch of 2; it returned {got}")


def head_names() -> list[str]:
    """Names accepted by ``wrap(..., head=...)``."""
    return sorted(_HEADS)


def create_head(head, site: ExitSite, num_classes: int, **kwargs) -> nn.Module:
    """Build the head `head` (a registered name or a callable) for the feature described by `site`."""
    if isinstance(head, str):
        if head not in _HEADS:
            raise ValueError(
                f"unknown head {head!r}; known heads: {', '.join(head_names())}, "
                "or pass a callable (channels, num_classes, layout) -> nn.Module"
            )
        cls = _HEADS[head]
        if hasattr(cls, "from_site"):
            return cls.from_site(site, num_classes, **kwargs)
        return cls(site.channels, num_classes, site.layout, **kwargs)
    if callable(head):
        module = head(site.channels, num_classes, site.layout, **kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"the head callable {head!r} returned {type(module).__name__}, expected an nn.Module")
        return module
    raise TypeError(f"head must be a name ({', '.join(head_names())}) or a callable, got {type(head).__name__}")
