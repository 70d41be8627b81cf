"""Choosing early-exit thresholds from cached exit logits.

`calibrate_thresholds` meets an average-FLOPs budget with MSDNet's budgeted-batch protocol (Huang
et al. 2018), or a target accuracy at the least FLOPs (with a statistical guarantee, through
`risk`); `evaluate_thresholds` scores given thresholds. Both return the `Calibration` that
`early_exit` takes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._checks import real_number
from ..cost.profile import ExitProfile
from ..runtime.criteria import (
    Calibration,
    calibration_temperature,
    check_criterion,
    check_temperatures,
    confidence_thresholds,
    patience_threshold,
)
from .cached import CachedExits
from .risk import risk_controlled_thresholds

__all__ = ["calibrate_thresholds", "evaluate_thresholds"]


def labeled_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy over the labeled samples (labels >= 0); NaN when none is labeled."""
    labeled = labels >= 0
    return (predicted[labeled] == labels[labeled]).double().mean().item() if bool(labeled.any()) else math.nan


class _Outcome(NamedTuple):
    accuracy: float
    flops: float
    exit_shares: list[float]


def _outcome(conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, costs: torch.Tensor, thresholds: Sequence[float]) -> _Outcome:
    """Accuracy, average FLOPs and exit shares of confidence thresholds on cached exits."""
    num_exits, n = conf.shape
    passed = torch.cat([conf[:-1] >= torch.tensor(thresholds, dtype=conf.dtype).unsqueeze(1), torch.ones(1, n, dtype=torch.bool)])
    exit_index = passed.float().argmax(0)
    counts = torch.bincount(exit_index, minlength=num_exits).double()
    return _Outcome(
        labeled_accuracy(preds[exit_index, torch.arange(n)], labels), (costs.double()[exit_index]).mean().item(), (counts / n).tolist()
    )


def evaluate_thresholds(cached: CachedExits, threshold=None, criterion="max_prob", ensemble: bool = False,
                        temperature=None, patience=None) -> Calibration:
    """Accuracy, average FLOPs and exit shares of `threshold` on cached exits (what `early_exit` would do).

    `temperature`: per-exit temperatures (`calibrate_temperature`) the confidences are read after;
    a `Calibration` given as `threshold` brings its own.
    """
    threshold = patience_threshold(threshold, criterion, patience)
    if threshold is None:
        raise ValueError("give threshold (or, with criterion='patience', patience)")
    temperature = calibration_temperature(threshold, temperature, cached.num_exits)
    conf_thresholds = confidence_thresholds(threshold, criterion, cached.num_exits, ensemble)
    scaled = cached.scaled(temperature)
    flops = torch.tensor(cached.flops, dtype=torch.float64)  # a large model's FLOPs are past float32's exact integers (2^24)
    out = _outcome(scaled.confidences(criterion, ensemble), scaled.predictions(ensemble), cached.labels, flops, conf_thresholds)
    return _calibration(conf_thresholds, criterion, ensemble, out, temperature)


def _calibration(conf_thresholds, criterion, ensemble, out: _Outcome, temperature=None) -> Calibration:
    user = [-t for t in conf_thresholds] if criterion == "entropy" else list(conf_thresholds)
    name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "callable")
    return Calibration(user, name, ensemble, out.accuracy, out.flops, out.exit_shares, temperature)


def _msdnet_thresholds(conf: torch.Tensor, q: float) -> list[float]:
    """MSDNet's budgeted batch: a share ∝ q^k of the samples leaves at exit k, the most confident first."""
    num_exits, n = conf.shape
    shares = torch.tensor([q ** (k + 1) for k in range(num_exits)], dtype=torch.float64)
    shares /= shares.sum()
    gone = torch.zeros(n, dtype=torch.bool)
    thresholds = []
    for k in range(num_exits - 1):
        take = math.floor(n * shares[k].item())
        remaining = conf[k][~gone]
        if take == 0 or remaining.numel() == 0:
            thresholds.append(math.inf)
            continue
        t = remaining.sort(descending=True).values[min(take, remaining.numel()) - 1].item()
        thresholds.append(t)
        gone |= conf[k] >= t
    return thresholds


def checked_costs(cached: CachedExits, costs) -> list[float] | None:
    """Per-exit costs in another unit (seconds from `profile_exits`), checked against `cached`; None for FLOPs."""
    if costs is None:
        return None

    if isinstance(costs, ExitProfile):
        if costs.stages != cached.stages:
            raise ValueError(
                f"costs is a profile of a model with exits at {costs.stages}, "
                f"the cached exits are at {cached.stages}: profile the same model"
            )
        costs = costs.seconds
    values = costs.tolist() if isinstance(costs, torch.Tensor) else list(costs)
    if len(values) != cached.num_exits:
        raise ValueError(f"costs has {len(values)} values; give one per exit ({cached.num_exits}): what a sample leaving there costs")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"costs must be finite numbers > 0, got {values}")
    if any(b < a for a, b in itertools.pairwise(values)):
        raise ValueError(f"costs must not decrease from exit to exit (leaving later computes more), got {values}")
    return [float(v) for v in values]


def calibrate_thresholds(cached: CachedExits, budget: float | None = None, *,
                         max_accuracy_drop: float | None = None, delta: float | None = None,
                         criterion="max_prob", ensemble: bool = False, temperature=None, costs=None) -> Calibration:
    """Thresholds that meet an average-FLOPs `budget`, or lose at most `max_accuracy_drop` at the least FLOPs.

    With `budget` (FLOPs per sample, between the first exit's cost and the full model's), the
    thresholds follow MSDNet's budgeted-batch protocol: a share of the samples proportional to
    ``q^k`` leaves at exit k, the most confident first, with the largest ``q`` whose average
    cost on `cached` is within the budget. With `max_accuracy_drop` (a fraction: 0.01 = one
    point below the last exit's accuracy), the cheapest of MSDNet's thresholds and of single
    shared thresholds (SDN's rule) that stays within the drop on `cached`. With `delta` too, a
    guarantee on new data from the same distribution: the accuracy drop against the last exit is
    at most `max_accuracy_drop` with probability at least ``1 - delta`` over the draw of `cached`
    (Learn-then-Test with a Hoeffding-Bentkus bound, as Jazbec et al. 2024 do; see
    `timm_exits.calibration.risk`). `costs`: what leaving at each exit costs in another unit, such as
    `profile_exits`' seconds (or the profile itself); `budget` is then in that unit, and the
    `Calibration`'s ``cost`` is the average in it (its ``flops`` stay FLOPs). `temperature`: per-exit
    temperatures (`calibrate_temperature`) the confidences are read after; the `Calibration`
    keeps them, and `early_exit` given it applies them. Returns a `Calibration` whose
    ``thresholds`` `early_exit` takes as they are.
    """
    if (budget is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one of budget (average FLOPs per sample) or max_accuracy_drop")
    if delta is not None and max_accuracy_drop is None:
        raise ValueError("delta goes with max_accuracy_drop: the guarantee bounds the accuracy lost against the last exit")
    check_criterion(criterion)
    temperature = check_temperatures(temperature, cached.num_exits)
    scaled = cached.scaled(temperature)
    conf, preds, labels = scaled.confidences(criterion, ensemble), scaled.predictions(ensemble), cached.labels
    custom = checked_costs(cached, costs)
    flops = torch.tensor(cached.flops, dtype=torch.float64)
    costs = torch.tensor(custom, dtype=torch.float64) if custom is not None else flops

    def run(thresholds) -> _Outcome:
        return _outcome(conf, preds, labels, costs, thresholds)

    def done(thresholds) -> Calibration:
        out = _outcome(conf, preds, labels, flops, thresholds)
        return dataclasses.replace(
            _calibration(thresholds, criterion, ensemble, out, temperature), cost=run(thresholds).flops if custom is not None else None
        )

    if budget is not None:
        lo_cost, hi_cost = costs[0].item(), costs[-1].item()
        unit = "FLOPs" if custom is None else "cost (in the unit of costs)"
        valid = f"an average {unit} per sample between the first exit's cost ({lo_cost:,.6g}) and the full model's ({hi_cost:,.6g})"
        given, budget = budget, real_number(budget, "budget", valid)  # a Python, numpy or 0-d tensor number
        if math.isnan(budget) or not lo_cost <= budget <= hi_cost:
            raise ValueError(f"budget must be {valid}, got {given!r}")
        never = [math.inf] * (cached.num_exits - 1)
        if run(never).flops <= budget:  # the whole model fits
            return done(never)
        best = [-math.inf] * (cached.num_exits - 1)  # everyone leaves at exit 1: the budget's floor
        lo, hi = math.log(1e-4), math.log(1e4)  # log q: the larger q, the later samples leave
        for _ in range(50):
            mid = (lo + hi) / 2
            thresholds = _msdnet_thresholds(conf, math.exp(mid))
            if run(thresholds).flops <= budget:
                lo, best = mid, thresholds
            else:
                hi = mid
        return done(best)
    valid_drop = "a fraction in [0, 1] (0.01 = one point)"
    max_accuracy_drop = real_number(max_accuracy_drop, "max_accuracy_drop", valid_drop)
    if not 0 <= max_accuracy_drop <= 1:
        raise ValueError(f"max_accuracy_drop must be {valid_drop}, got {max_accuracy_drop!r}")
    if not bool((labels >= 0).any()):
        raise ValueError("max_accuracy_drop needs labeled samples: every label of the cached exits is negative (unlabeled)")
    if delta is not None:
        valid = "a probability in (0, 1): the chance the guarantee may fail (0.1 = 90 % confidence)"
        if not 0 < real_number(delta, "delta", valid) < 1:
            raise ValueError(f"delta must be {valid}, got {delta!r}")
        if criterion == "patience":
            raise ValueError("delta (a guarantee) works with confidence criteria; the patience criterion's thresholds are counts")
        return done(risk_controlled_thresholds(conf, preds, labels, float(max_accuracy_drop), float(delta)))
    target = labeled_accuracy(preds[-1], labels) - max_accuracy_drop
    candidates = [[math.inf] * (cached.num_exits - 1)]
    candidates += [_msdnet_thresholds(conf, q) for q in torch.logspace(-3, 3, 61, dtype=torch.float64).tolist()]
    candidates += [
        [t] * (cached.num_exits - 1)
        for t in torch.quantile(conf[:-1].flatten().double(), torch.linspace(0, 1, 101, dtype=torch.float64)).tolist()
    ]
    outcomes = [(run(t), t) for t in candidates]
    _, best = min(((o, t) for o, t in outcomes if o.accuracy >= target - 1e-12), key=lambda pair: (pair[0].flops, -pair[0].accuracy))
    return done(best)


