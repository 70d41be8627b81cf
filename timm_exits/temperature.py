"""Per-exit temperature scaling: confidences an exit can be trusted with.

Guo et al. (2017, "On Calibration of Modern Neural Networks") divide a network's logits by one
temperature T, fitted by the negative log-likelihood on held-out data; the predicted class does
not change, the confidence does. Early exit decides on confidences, and each exit of a
multi-exit model is over- or under-confident in its own way, so `calibrate_temperature` fits one
temperature per exit (as earlyon does for its exits) on cached validation logits. `early_exit`,
`evaluate_thresholds`, `calibrate_thresholds` and `budgeted_curve` take them as ``temperature=``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["TemperatureFit", "calibrate_temperature", "expected_calibration_error", "check_temperatures"]


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
    """One temperature per exit, and each exit's NLL and expected calibration error before and after, on the data it was fit on."""

    temperatures: list[float]
    nll_before: list[float]
    nll_after: list[float]
    ece_before: list[float]
    ece_after: list[float]


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE of ``(N, C)`` logits: the gap between confidence (top softmax probability) and accuracy,
    averaged over `bins` equal-width confidence bins weighted by their samples (Guo et al.'s 15 bins)."""
    probs = logits.double().softmax(-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1], right=True)  # bin b holds (edges[b], edges[b+1]]
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, torch.ones_like(confidence))
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence - correct)
    return float(gap.abs().sum() / max(len(labels), 1))


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
    from .calibration import CachedExits

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


def check_temperatures(temperature, num_exits: int) -> list[float] | None:
    """`temperature` (a `TemperatureFit`, or one positive number per exit) as a list, or None; a clear error otherwise."""
    if temperature is None:
        return None
    values = temperature.temperatures if isinstance(temperature, TemperatureFit) else temperature
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, numbers.Real) or not isinstance(values, Sequence):
        raise ValueError(f"temperature must be one positive number per exit ({num_exits}), or calibrate_temperature's result; got {temperature!r}")
    values = list(values)
    if len(values) != num_exits:
        raise ValueError(f"temperature has {len(values)} values; give one per exit ({num_exits}), as calibrate_temperature fits them")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"temperatures must be finite numbers > 0, got {values}")
    return [float(v) for v in values]
