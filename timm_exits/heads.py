"""Exit heads: small classifiers that read a backbone feature and return logits.

A head is built from the feature it reads (channels, layout) and the number of classes. Built-in
heads are chosen by name (``head="sdn"``), like timm's ``create_act_layer``; any callable
``(channels, num_classes, layout) -> nn.Module`` works too. Every head maps a feature in its
layout (``NCHW``, ``NHWC`` or ``NLC`` tokens) to ``(B, num_classes)`` logits and, when asked,
also returns the pooled feature its classifier read (for feature-level distillation).
"""
from __future__ import annotations

import json
import math
from typing import Callable

import torch
from torch import nn

from .stages import FeatureLayout
from .surgery import ExitSite
from .tracing import set_training

__all__ = ["register_head", "create_head", "check_head", "ExitHeads", "head_names", "LinearHead", "SDNHead", "ConvHead", "BottleneckHead", "ReplicaHead", "FeaturePool", "CascadedHead"]

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
        raise ValueError(f"a head named {name!r} is already registered ({_HEADS[name].__name__}); pass register_head({name!r}, override=True) to replace it everywhere, or choose another name")

    def add(cls):
        _HEADS[name] = cls
        return cls

    return add


def _positive(value, name: str, head: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"head_kwargs {name}={value!r} builds no {head} head: it must be a positive int")
    return value


def check_head(module: nn.Module, site: ExitSite, num_classes: int, which: str) -> None:
    """Run a new head on a feature shaped like the one it will read; raise unless it gives ``(B, num_classes)`` logits.

    A batch of two, so that a head which mixes the samples is caught too. The head's modes are
    put back as they were.
    """
    ref = next(module.parameters(), None)
    x = torch.randn(2, *site.shape[1:], device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
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
            raise ValueError(f"unknown head {head!r}; known heads: {', '.join(head_names())}, or pass a callable (channels, num_classes, layout) -> nn.Module")
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


def _to_nchw(x: torch.Tensor, layout: FeatureLayout) -> torch.Tensor:
    """NHWC -> NCHW; tokens -> a square NCHW grid (prefix tokens dropped)."""
    if layout.format == "NHWC":
        return x.permute(0, 3, 1, 2)
    if layout.format == "NLC":
        tokens = x[:, layout.num_prefix_tokens :]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"this head needs a square grid of tokens, got {tokens.shape[1]} patch tokens")
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    return x


class FeaturePool(nn.Module):
    """Global pooling to ``(B, C)`` for any layout; transformer layouts get the LayerNorm their own head has."""

    def __init__(self, channels: int, layout: FeatureLayout):
        super().__init__()
        self.layout = layout
        self.norm = nn.LayerNorm(channels) if layout.format in ("NHWC", "NLC") else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.layout.format
        if fmt == "NCHW":
            x = x.mean((2, 3))
        elif fmt == "NHWC":
            x = x.mean((1, 2))
        elif self.layout.token_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, self.layout.num_prefix_tokens :].mean(1)
        return self.norm(x)

    def extra_repr(self) -> str:
        return f"layout={self.layout.format}" + (f", token_pool={self.layout.token_pool}" if self.layout.format == "NLC" else "")


class _Head(nn.Module):
    """Shared forward: ``features(x)`` -> pooled vector -> ``fc``; optionally return the vector too."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.features(x)
        logits = self.fc(f)
        return (logits, f) if return_features else logits

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier of `num_classes` outputs on the same pooled feature."""
        old = self.fc
        self.fc = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)


@register_head("linear")
class LinearHead(_Head):
    """Global average pool (class token for ViTs that use it) + linear."""

    def __init__(self, channels: int, num_classes: int, layout: FeatureLayout, drop_rate: float = 0.0):
        super().__init__()
        self.pool = FeaturePool(channels, layout)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)

    def features(self, x):
        return self.drop(self.pool(x))


@register_head("sdn")
class SDNHead(_Head):
    """Kaya et al. 2019 (Shallow-Deep Networks): a learned mix of max and average pooling + linear.

    ``alpha * maxpool + (1 - alpha) * avgpool`` with a trainable scalar alpha, pooled to a
    ``grid x grid`` map (4 x 4, as their code does for features of side >= 4), flattened, then a
    linear layer. Their code fixes the pooling kernel from the training resolution; adaptive
    pooling gives the same 4 x 4 grid there and keeps working at other input sizes. Tokens are
    mixed over the token axis (no grid).
    """

    def __init__(self, channels: int, num_classes: int, layout: FeatureLayout, grid: int = 4):
        super().__init__()
        self.layout = layout
        self.grid = 1 if layout.format == "NLC" else _positive(grid, "grid", "sdn")
        self.alpha = nn.Parameter(torch.rand(1))
        self.fc = nn.Linear(channels * self.grid * self.grid, num_classes)

    def features(self, x):
        if self.layout.format == "NLC":
            x = x[:, self.layout.num_prefix_tokens :]
            mixed = self.alpha * x.amax(1) + (1 - self.alpha) * x.mean(1)
        else:
            x = _to_nchw(x, self.layout)
            mixed = self.alpha * nn.functional.adaptive_max_pool2d(x, self.grid) + (1 - self.alpha) * nn.functional.adaptive_avg_pool2d(x, self.grid)
        return mixed.flatten(1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register_head("conv")
class ConvHead(_Head):
    """MSDNet's classifier (Huang et al. 2018), used by Phuong & Lampert 2019.

    Two 3x3 stride-2 conv-BN-ReLU layers of `width` channels (128 in MSDNet), global average
    pool, linear. Tokens are first laid out on their square grid.
    """

    def __init__(self, channels: int, num_classes: int, layout: FeatureLayout, width: int = 128):
        super().__init__()
        self.layout = layout
        width = _positive(width, "width", "conv")
        self.convs = nn.Sequential(_conv_bn_relu(channels, width, 3, 2), _conv_bn_relu(width, width, 3, 2))
        self.fc = nn.Linear(width, num_classes)

    def features(self, x):
        return self.convs(_to_nchw(x, self.layout)).mean((2, 3))


@register_head("bottleneck")
class BottleneckHead(_Head):
    """BYOT (Zhang et al. 2019): a bottleneck that brings the feature to the final stage's shape.

    1x1 conv to `width`, kxk conv with stride k (k = the final stage's reduction over this
    one's, so the spatial size matches the backbone's last stage), 1x1 conv to the final width,
    each with BN-ReLU; then global average pool and linear. The pooled feature has the same size
    as the backbone's pre-logits feature, so feature hints ``||f_i - f_N||^2`` need no adapter.
    """

    def __init__(self, channels: int, num_classes: int, layout: FeatureLayout, out_channels: int, stride: int = 1, width: int | None = None):
        super().__init__()
        self.layout = layout
        width = max(channels, out_channels // 4) if width is None else _positive(width, "width", "bottleneck")
        self.body = nn.Sequential(
            _conv_bn_relu(channels, width, 1, 1),
            nn.Sequential(nn.Conv2d(width, width, stride, stride, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)) if stride > 1 else nn.Identity(),
            _conv_bn_relu(width, out_channels, 1, 1),
        )
        self.fc = nn.Linear(out_channels, num_classes)

    @classmethod
    def from_site(cls, site: ExitSite, num_classes: int, **kwargs):
        stride = 1
        if site.reduction and site.final_reduction:
            stride = max(1, site.final_reduction // site.reduction)
        kwargs.setdefault("stride", stride)
        return cls(site.channels, num_classes, site.layout, out_channels=site.final_channels, **kwargs)

    def features(self, x):
        return self.body(_to_nchw(x, self.layout)).mean((2, 3))


@register_head("replica")
class ReplicaHead(_Head):
    """MSD (Luan et al. 2019): the branch is a copy of the first block of each later stage.

    The copies start from the backbone's current weights (pretrained ones when the backbone is
    pretrained) and train on their own; then global pooling in the layout of the last stage and
    a linear layer. For a ViT, where every block is a stage, that is a copy of every later
    block: choose early stages with that in mind.
    """

    def __init__(self, blocks: list[nn.Module], channels: int, num_classes: int, layout: FeatureLayout):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = FeaturePool(channels, layout)
        self.fc = nn.Linear(channels, num_classes)

    @classmethod
    def from_site(cls, site: ExitSite, num_classes: int):
        if site.replicate is None:
            raise ValueError("the replica head copies blocks out of the traced graph; this model could not be traced with torch.fx")
        blocks, channels, layout = site.replicate()
        return cls(blocks, channels, num_classes, layout)

    def features(self, x):
        return self.pool(self.blocks(x))


class CascadedHead(nn.Module):
    """Zero Time Waste's cascade (Wołczyk et al. 2021): a head that also reads the previous exit's logits.

    ``forward(x, previous)`` is ``head(x) + W norm(previous)``, `previous` detached, ``W`` a
    ``(num_classes, num_classes)`` linear map without bias. For a head that ends in a linear
    layer on its pooled feature (every built-in head), that is the authors' layer: a linear
    classifier on the pooled feature concatenated with the previous logits
    (gmum/Zero-Time-Waste, ``ztw_cv_original/aux_funcs.py``, ``InternalClassifier`` with
    ``--stacking --detach_prev``); the classifier and ``W`` then start as that one layer of
    ``feature + num_classes`` inputs would (PyTorch's default uniform bound ``1/sqrt(fan_in)``).
    ``norm=True`` puts a LayerNorm on the detached logits first (their ``--detach_norm
    layernorm``). Any head kind can be cascaded; ``wrap(..., cascade=True)`` cascades every exit
    head after the first, and the wrapped model passes each exit's logits on, also when early
    exit drops samples and in exported steps.
    """

    cascaded = True

    def __init__(self, head: nn.Module, num_classes: int, norm: bool = False, detach: bool = True):
        super().__init__()
        ref = next(head.parameters(), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None and ref.is_floating_point() else {}
        self.head = head
        self.norm = nn.LayerNorm(num_classes, **factory) if norm else nn.Identity()
        self.previous = nn.Linear(num_classes, num_classes, bias=False, **factory)
        self.detach = detach
        self._init_as_one_layer()

    def _init_as_one_layer(self) -> None:
        fc = getattr(self.head, "fc", None)
        if isinstance(fc, nn.Linear):
            bound = 1.0 / math.sqrt(fc.in_features + self.previous.in_features)
            with torch.no_grad():
                for p in (fc.weight, fc.bias, self.previous.weight):
                    if p is not None:
                        p.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, previous: torch.Tensor, return_features: bool = False):
        previous = self.norm(previous.detach() if self.detach else previous)
        out = self.head(x, return_features=True) if return_features else self.head(x)
        if return_features:
            logits, feature = out
            return logits + self.previous(previous.to(logits.dtype)), feature
        return out + self.previous(previous.to(out.dtype))

    def reset_classifier(self, num_classes: int) -> None:
        """Reset the inner head's classifier and the map from the previous logits, for `num_classes` classes."""
        self.head.reset_classifier(num_classes)
        ref = self.previous.weight
        self.norm = nn.LayerNorm(num_classes, device=ref.device, dtype=ref.dtype) if isinstance(self.norm, nn.LayerNorm) else nn.Identity()
        self.previous = nn.Linear(num_classes, num_classes, bias=False, device=ref.device, dtype=ref.dtype)
        self._init_as_one_layer()

    def extra_repr(self) -> str:
        return f"detach={self.detach}"


def head_kind(head: nn.Module) -> str:
    """A head's class name, a cascaded head's with the head it wraps (``"CascadedHead(SDNHead)"``); a compiled head's as it was."""
    head = getattr(head, "compiled_from", head)  # compile_exits' CompiledPart
    return f"CascadedHead({type(head.head).__name__})" if isinstance(head, CascadedHead) else type(head).__name__


class ExitHeads(nn.ModuleList):
    """The exit heads, shallow to deep, and the wrap they were built for.

    A checkpoint records that wrap (the stages, each head's class) under ``exits._extra_state``,
    so that loading one from a model wrapped at other stages is refused by name even when the
    heads' shapes happen to agree.
    """

    def __init__(self, heads=None, stages=None):
        super().__init__(heads)
        self.stages = None if stages is None else list(stages)

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a slice keeps its heads' stages
            return type(self)(list(self._modules.values())[idx], None if self.stages is None else self.stages[idx])
        return super().__getitem__(idx)

    def _record(self) -> dict:
        return {"stages": list(self.stages), "heads": [head_kind(h) for h in self]}

    def get_extra_state(self) -> torch.Tensor:
        """JSON bytes in a uint8 tensor, so that torch.save, safetensors and distributed checkpoints all carry it."""
        return torch.tensor(list(json.dumps(self._record()).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Nothing to restore: the record is derived from the heads, and checked when a checkpoint loads."""

    def mismatch(self, saved) -> str | None:
        """How the wrap recorded in a checkpoint differs from this one, or None."""
        if not isinstance(saved, torch.Tensor):
            return None
        record, own = json.loads(bytes(saved.tolist()).decode()), self._record()
        if record == own:
            return None
        return (
            f"the checkpoint comes from a model wrapped at stages {record.get('stages')} with heads {record.get('heads')}; "
            f"this one is wrapped at stages {own['stages']} with heads {own['heads']}: wrap the backbone as it was when saved "
            "(or load with strict=False to take what fits)"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "_extra_state"
        mismatch = self.mismatch(state_dict.get(key))
        if mismatch:  # reported like an unexpected key, so that strict=False still takes what fits (also inside a parent module)
            unexpected_keys.append(f"{key} ({mismatch})")
        state_dict[key] = self.get_extra_state()  # a checkpoint saved before the wrap was recorded has none: it loads as before
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
