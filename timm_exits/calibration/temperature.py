"""Per-exit temperature scaling: confidences an exit can be trusted with.

Guo et al. (2017, "On Calibration of Modern Neural Networks") divide a network's logits by one
temperature T, fitted by the negative log-likelihood on held-out data; the predicted class does
not change, the confidence does. Early exit decides on confidences, and each exit of a
multi-exit model is over- or under-confident in its own way, so `calibrate_temperature` fits one
temperature per exit (as earlyon does for its exits) on cached validation logits. `early_exit`,
`evaluate_thresholds`, `calibrate_thresholds` and `budgeted_curve` take them as ``temperature=``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..runtime.criteria import TemperatureFit
from .cached import CachedExits

__all__ = ["calibrate_temperature", "expected_calibration_error"]


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of ``(N, C)`` logits, in [0, 1]: the gap between confidence (top softmax probability) and
    accuracy, averaged over `bins` equal-width confidence bins weighted by their samples.

    Guo et al. (2017) use 15 bins, bin m holding the confidences in ``((m-1)/M, m/M]``: one
    exactly on an edge falls in the lower bin. Unlabeled samples (negative labels, such as
    ``-100``) are left out, as everywhere in the library.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = logits.shape if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}" + (
            f" of shape {tuple(logits.shape)}" if hasattr(logits, "shape") else "")
        raise ValueError(f"logits must be one exit's (N, C) tensor, got {got}; for cached exits pass cached.logits[k]")
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:1] or labels.is_floating_point():
        got = f"a {tuple(labels.shape)} tensor of {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be ({logits.shape[0]},) class indices, one per row of logits, got {got}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1 (Guo et al. use 15), got {bins!r}")
    labeled = labels >= 0
    if not bool(labeled.any()):
        raise ValueError("expected_calibration_error needs labeled samples: every label is negative (unlabeled)")
    confidence, predicted = logits[labeled].double().softmax(-1).max(-1)
    correct = (predicted == labels[labeled]).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1])  # bin b holds (edges[b], edges[b+1]]
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence - correct)
    return float(gap.abs().sum() / len(confidence))


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits / temperature, labels))


def _fit(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature of least NLL: golden-section search over log T in [-5, 5] (the NLL is unimodal in T)."""
    lo, hi = -5.0, 5.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logits, labels, math.exp(a)), _nll(logits, labels, math.exp(b))
    for _ in range(steps):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def calibrate_temperature(cached) -> TemperatureFit:
    """Fit one temperature per exit by the NLL of `cached`'s labeled samples (validation logits, from `collect_exit_logits`).

    Returns a `TemperatureFit`; pass it (or its ``temperatures``) as ``temperature=`` to
    `early_exit` and the calibration functions. Unlabeled samples (negative labels) are left out.
    """
    if not isinstance(cached, CachedExits):
        raise TypeError(f"cached must be a CachedExits (timm_exits.collect_exit_logits(...)), got {type(cached).__name__}")
    labeled = cached.labels >= 0
    if int(labeled.sum()) == 0:
        raise ValueError("calibrate_temperature needs labeled samples: every label of the cached exits is negative (unlabeled)")
    logits, labels = cached.logits[:, labeled].double(), cached.labels[labeled]
    temperatures = [_fit(z, labels) for z in logits]
    return TemperatureFit(
        temperatures=temperatures,
        nll_before=[_nll(z, labels, 1.0) for z in logits],
        nll_after=[_nll(z, labels, t) for z, t in zip(logits, temperatures)],
        ece_before=[expected_calibration_error(z, labels) for z in logits],
        ece_after=[expected_calibration_error(z / t, labels) for z, t in zip(logits, temperatures)],
    )


