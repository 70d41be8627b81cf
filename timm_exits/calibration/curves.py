"""The accuracy-compute trade-off as data: each exit alone (anytime) and early exit over a sweep of budgets."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .cached import CachedExits
from .thresholds import calibrate_thresholds, checked_costs, evaluate_thresholds, labeled_accuracy

__all__ = ["AnytimePoint", "CurvePoint", "anytime_accuracy", "budgeted_curve"]


class AnytimePoint(NamedTuple):
    exit: int
    stage: str
    accuracy: float
    flops: float


class CurvePoint(NamedTuple):
    budget: float
    accuracy: float
    flops: float
    exit_shares: list[float]
    thresholds: list[float]


def anytime_accuracy(cached: CachedExits, ensemble: bool = False) -> list[AnytimePoint]:
    """Accuracy of every exit (or anytime ensemble) against what reaching it costs."""
    preds = cached.predictions(ensemble)
    return [AnytimePoint(k, cached.stages[k], labeled_accuracy(preds[k], cached.labels), cached.flops[k]) for k in range(cached.num_exits)]


def budgeted_curve(cached: CachedExits, budgets: Sequence[float] | int = 20, criterion="max_prob", ensemble: bool = False,
                   evaluate_on: CachedExits | None = None, temperature=None, costs=None) -> list[CurvePoint]:
    """Accuracy against average FLOPs over a sweep of budgets (default: 20 from the first exit's cost to the full model's).

    Thresholds are calibrated on `cached` for each budget; with `evaluate_on` (say, the test
    set's cached exits) the accuracy and FLOPs are those on it, as a paper reports them.
    `temperature`: per-exit temperatures (`calibrate_temperature`), applied to both. `costs`:
    budgets in another unit (`profile_exits`' seconds); the points' FLOPs stay FLOPs.
    """
    if evaluate_on is not None and evaluate_on.num_exits != cached.num_exits:
        raise ValueError(
            f"evaluate_on has {evaluate_on.num_exits} exits, the calibration data {cached.num_exits}: they must come from the same model"
        )
    if isinstance(budgets, int):
        scale = checked_costs(cached, costs) or cached.flops
        lo, hi = scale[0], scale[-1]
        budgets = [lo + (hi - lo) * i / (budgets - 1) for i in range(budgets)] if budgets > 1 else [hi]
    points = []
    for b in budgets:
        c = calibrate_thresholds(cached, b, criterion=criterion, ensemble=ensemble, temperature=temperature, costs=costs)
        if evaluate_on is not None:
            c = evaluate_thresholds(evaluate_on, c.thresholds, criterion, ensemble, temperature=temperature)
        points.append(CurvePoint(float(b), c.accuracy, c.flops, c.exit_shares, c.thresholds))
    return points
