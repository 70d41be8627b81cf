"""The built-in exit heads: small classifiers that read a backbone feature and return logits.

Every head maps a feature in its layout (``NCHW``, ``NHWC`` or ``NLC`` tokens) to
``(B, num_classes)`` logits and, when asked, also returns the pooled feature its classifier
read (for feature-level distillation).
"""
from __future__ import annotations

import torch
from torch import nn

from ..fx.stages import FeatureLayout
from ..fx.surgery import ExitSite
from .registry import register_head

__all__ = ["FeaturePool", "LinearHead", "SDNHead", "ConvHead", "BottleneckHead", "ReplicaHead"]


def _positive(value, name: str, head: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"head_kwargs {name}={value!r} builds no {head} head: it must be a positive int")
    return value


def _to_nchw(x: torch.Tensor, layout: FeatureLayout) -> torch.Tensor:
    """NHWC -> NCHW; tokens -> a square NCHW grid (prefix tokens dropped)."""
    if layout.format == "NHWC":
        return x.permute(0, 3, 1, 2)
    if layout.format == "NLC":
        tokens = x[:, layout.num_prefix_tokens :]
        side = round(tokens.shape[1] ** 0.5)
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
            mixed = (self.alpha * nn.functional.adaptive_max_pool2d(x, self.grid)
                     + (1 - self.alpha) * nn.functional.adaptive_avg_pool2d(x, self.grid))
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

    def __init__(self, channels: int, num_classes: int, layout: FeatureLayout, out_channels: int,
                 stride: int = 1, width: int | None = None):
        super().__init__()
        self.layout = layout
        width = max(channels, out_channels // 4) if width is None else _positive(width, "width", "bottleneck")
        self.body = nn.Sequential(
            _conv_bn_relu(channels, width, 1, 1),
            (nn.Sequential(nn.Conv2d(width, width, stride, stride, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
             if stride > 1 else nn.Identity()),
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


