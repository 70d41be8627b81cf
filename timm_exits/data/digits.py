"""A task where exits differ: scikit-learn's digits, each scan in several corrupted variants.

The 1,797 bundled 8x8 scans are upscaled to 32x32; each gives `variants` images, every one with
one seeded corruption (an affine warp, blur, elastic distortion, noise, an occluding patch or
lowered contrast) at a severity from 1 (barely visible) to 5 (hard even for a person), so the
samples range from trivial to hard: the regime early exit is for. Splits are by scan, stratified
by class, so no variant of a test digit is seen in training; a validation split is kept for
calibration, and a limited-label view of the training split serves the semi-supervised setting.
Everything is a function of the seed: the same seed gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .._checks import is_int, require
from .splits import SplitMethods, TaskMethods

__all__ = ["CORRUPTIONS", "DigitsSplit", "DigitsTask", "corrupted_digits"]

#: The corruptions, in the order of `DigitsSplit.corruption`'s codes.
CORRUPTIONS = ("affine", "blur", "elastic", "noise", "occlusion", "contrast")


@dataclasses.dataclass(frozen=True)
class DigitsSplit(SplitMethods):
    """One split: images ``x`` (N, 1, H, W), standardized with the training split's statistics, and labels ``y``.

    ``source`` is the index of the scan each image comes from (in scikit-learn's order),
    ``severity`` its corruption's severity (1-5) and ``corruption`` an index into `CORRUPTIONS`.
    """

    x: torch.Tensor
    y: torch.Tensor
    source: torch.Tensor
    severity: torch.Tensor
    corruption: torch.Tensor


@dataclasses.dataclass(frozen=True)
class DigitsTask(TaskMethods):
    """The train, validation and test splits, and which training images keep their label in the limited-label setting."""

    train: DigitsSplit
    val: DigitsSplit
    test: DigitsSplit
    labeled: torch.Tensor  # bool, one per training image
    seed: int

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(str(c) for c in range(10))

    @property
    def name(self) -> str:
        return "corrupted digits"


def _scans(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits in [0, 1] at `size` x `size`, and their labels."""
    try:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is in the demo extra, not a dependency
    except ImportError as err:
        raise ImportError("the digits come with scikit-learn: pip install 'timm-exits[demo]'") from err
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1), torch.tensor(digits.target)


def _split_by_scan(y: torch.Tensor, fractions: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """0 (train), 1 (val) or 2 (test) for each scan; every class split in the same proportions."""
    part = torch.empty(len(y), dtype=torch.long)
    for c in range(10):
        scans = torch.nonzero(y == c).flatten()
        scans = scans[torch.randperm(len(scans), generator=g)]
        n_train, n_val = round(len(scans) * fractions[0]), round(len(scans) * fractions[1])
        part[scans[:n_train]], part[scans[n_train : n_train + n_val]], part[scans[n_train + n_val :]] = 0, 1, 2
    return part


def _uniform(n: int, g: torch.Generator, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _affine(x, s, g):
    """Rotation up to 12 degrees per severity, scale by up to 8 %, shift by up to 2.5 % of the width."""
    n = len(x)
    angle = torch.deg2rad(12.0 * s * _uniform(n, g))
    scale = 1.0 + 0.08 * s * _uniform(n, g)
    shift = 0.05 * s.unsqueeze(1) * torch.stack([_uniform(n, g), _uniform(n, g)], 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return _warp(x, theta)


def _gaussian(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (in pixels)."""
    radius = math.ceil(3 * float(sigma.max()))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.unsqueeze(1)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, K)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0)), k.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius)), k.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _blur(x, s, g):
    """Gaussian blur, sigma 0.8 px per severity (at 32 px)."""
    return _gaussian(x, 0.8 * s * x.shape[-1] / 32)


def _elastic(x, s, g):
    """Elastic distortion: a random displacement field smoothed over 3 px, its standard deviation 0.8 px per severity."""
    n, _, h, w = x.shape
    field = _gaussian(torch.randn(n, 2, h, w, generator=g), torch.full((n,), 3.0 * w / 32))
    field = field / field.flatten(1).std(1).clamp_min(1e-6).view(n, 1, 1, 1)
    field = field * (1.6 * s * 2 / w).view(n, 1, 1, 1) / 2  # pixels to normalized coordinates
    identity = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    return F.grid_sample(x, identity + field.permute(0, 2, 3, 1), padding_mode="zeros", align_corners=False)


def _noise(x, s, g):
    """Additive Gaussian noise, standard deviation 0.2 per severity (images in [0, 1])."""
    return x + 0.2 * s.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)


def _occlusion(x, s, g):
    """A square patch of random grey over the digit, its side 20 % of the image plus 8 % per severity."""
    n, _, h, w = x.shape
    side = ((0.2 + 0.08 * s) * w).round().long()
    top = (torch.rand(n, generator=g) * (h - side + 1)).long()
    left = (torch.rand(n, generator=g) * (w - side + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1)))
    grey = torch.rand(n, generator=g).view(n, 1, 1)
    return torch.where(inside.unsqueeze(1), grey.unsqueeze(1), x)


def _contrast(x, s, g):
    """Contrast scaled down by 19 % per severity towards a random grey, plus faint noise."""
    c = (1 - 0.19 * s).view(-1, 1, 1, 1)
    grey = torch.rand(len(x), generator=g).view(-1, 1, 1, 1)
    return c * x + (1 - c) * grey + 0.05 * torch.randn(x.shape, generator=g)


_APPLY = {"affine": _affine, "blur": _blur, "elastic": _elastic, "noise": _noise, "occlusion": _occlusion, "contrast": _contrast}


def _corrupt(x: torch.Tensor, severity: torch.Tensor, kind: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = x.clone()
    for code, name in enumerate(CORRUPTIONS):
        rows = torch.nonzero(kind == code).flatten()
        if len(rows):
            out[rows] = _APPLY[name](x[rows], severity[rows].to(x.dtype), g)
    return out.clamp(0, 1)


def corrupted_digits(seed: int = 0, variants: int = 6, size: int = 32, labels_per_class: int = 20,
                     fractions: tuple[float, float] = (0.6, 0.15)) -> DigitsTask:
    """The corrupted-digits task: train, validation and test splits of 1 x `size` x `size` images, 10 classes.

    Args:
        seed: fixes the split, the corruptions and the limited labels (same seed, same bytes).
        variants: corrupted images per scan; each draws its corruption and severity (1-5) uniformly.
        size: image side in pixels.
        labels_per_class: training images per class that keep their label in `DigitsTask.limited`
            (each from a different scan).
        fractions: the shares of scans for training and validation; the rest is the test split.

    Example::

        >>> task = corrupted_digits(seed=0)
        >>> len(task.train), len(task.val), len(task.test)
        (6468, 1614, 2700)
    """
    require("seed", seed, "an int", is_int(seed))
    require("variants", variants, "an int >= 1", is_int(variants) and variants >= 1)
    require("size", size, "an int >= 8", is_int(size) and size >= 8)
    require("labels_per_class", labels_per_class, "an int >= 1", is_int(labels_per_class) and labels_per_class >= 1)
    shares = (isinstance(fractions, (tuple, list)) and len(fractions) == 2
              and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions))
    require("fractions", fractions, "(train, val) shares > 0 that sum below 1", shares and min(fractions) > 0 and sum(fractions) < 1)
    g = torch.Generator().manual_seed(seed)
    scans, labels = _scans(size)
    part = _split_by_scan(labels, fractions, g)
    empty = [name for p, name in enumerate(("train", "validation", "test"))
             if any(not bool(((part == p) & (labels == c)).any()) for c in range(10))]
    require("fractions", fractions, "shares that leave every split a scan of every class", not empty)
    source = torch.arange(len(labels)).repeat_interleave(variants)
    severity = torch.randint(1, 6, (len(source),), generator=g)
    kind = torch.randint(0, len(CORRUPTIONS), (len(source),), generator=g)
    x = _corrupt(scans[source], severity, kind, g)
    train_rows = part[source] == 0
    mean, std = x[train_rows].mean(), x[train_rows].std()
    x = (x - mean) / std
    splits = [DigitsSplit(x, labels[source], source, severity, kind).subset(part[source] == p) for p in range(3)]
    labeled = torch.zeros(len(splits[0]), dtype=torch.bool)
    for c in range(10):
        rows = torch.nonzero(splits[0].y == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        _, first = _first_per_scan(splits[0].source[rows])
        require("labels_per_class", labels_per_class, f"at most {len(first)} (the training scans of class {c})",
                labels_per_class <= len(first))
        labeled[rows[first[:labels_per_class]]] = True
    return DigitsTask(*splits, labeled=labeled, seed=seed)


def _first_per_scan(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct scans in `source` and the position of each one's first image, in order of appearance."""
    seen: dict[int, int] = {}
    for i, s in enumerate(source.tolist()):
        seen.setdefault(s, i)
    return torch.tensor(list(seen)), torch.tensor(list(seen.values()))
