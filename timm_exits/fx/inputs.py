"""The input a model takes: its default size (patch embedding, pretrained_cfg, or 3x224x224), checks, a dummy batch."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["default_input_size", "check_input_size", "dummy_input"]


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size the backbone expects: its patch embedding's, its config's, or 3x224x224."""
    chans = _in_chans(model)
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None) or getattr(model, "image_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        return (chans, int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg and chans == cfg["input_size"][0]:
        return tuple(int(v) for v in cfg["input_size"])
    return (chans, 224, 224)


def _in_chans(model: nn.Module) -> int:
    """The channels the backbone takes: its ``in_chans``, else those of the first conv its pretrained_cfg names, else 3."""
    if getattr(model, "in_chans", None):
        return int(model.in_chans)
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")  # timm before 1.0.25 keeps no in_chans on a ResNet
    try:
        return int(model.get_submodule(first).in_channels) if isinstance(first, str) else 3
    except (AttributeError, TypeError):
        return 3


def check_input_size(input_size, model) -> tuple[int, ...]:
    if input_size is None:
        return default_input_size(model)
    if isinstance(input_size, (str, bytes)) or not hasattr(input_size, "__iter__"):
        raise ValueError(f"input_size must be three positive ints (channels, height, width), got {input_size!r}")
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"input_size must be three positive ints (channels, height, width), got {input_size!r}")
    return size


def dummy_input(model: nn.Module, size: Sequence[int]) -> torch.Tensor:
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else "cpu"
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.randn(1, *size, device=device, dtype=dtype)
