"""Choosing early-exit thresholds from cached exit logits, and the accuracy-compute trade-off as data and a plot.

`collect_exit_logits` caches every exit's logits on a validation set; `calibrate_thresholds` meets
an average-FLOPs budget with MSDNet's budgeted-batch protocol (Huang et al. 2018), or a target
accuracy at the least FLOPs. `anytime_accuracy` and `budgeted_curve` give the trade-off as data,
`plot_tradeoff` as a PNG. Thresholds come back as the `Calibration` that `early_exit` takes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections import Counter
from typing import NamedTuple, Sequence

import torch

from ._checks import figure_path, real_number
from ._progress import Progress
from .inference import Calibration, calibration_temperature, check_criterion, check_ensemble, confidence_thresholds, exit_confidence, exit_costs, patience_streaks, patience_threshold
from .model import MultiExitModel
from .risk import risk_controlled_thresholds
from .temperature import check_temperatures
from .tracing import evaluating

__all__ = [
    "CachedExits",
    "collect_exit_logits",
    "calibrate_thresholds",
    "evaluate_thresholds",
    "anytime_accuracy",
    "budgeted_curve",
    "plot_tradeoff",
]


@dataclasses.dataclass
class CachedExits:
    """Every exit's logits on a dataset, its labels, and what leaving at each exit costs.

    ``logits (E, N, C)``, ``labels (N,)``, ``flops`` (E values: backbone up to exit k plus heads
    0..k, per sample, as `early_exit` spends them) and the exits' ``stages``. A negative label
    (the losses' ``ignore_index``, -100) marks an unlabeled sample: it counts in the FLOPs
    averages and the exit shares, not in the accuracies.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    flops: list[float]
    stages: list[str]

    def __post_init__(self):
        if self.logits.dim() == 3 and self.logits.shape[1] == 0:
            raise ValueError("logits hold no samples (shape (num_exits, 0, C)): thresholds need cached exits of at least one sample")
        if self.logits.dim() != 3:
            raise ValueError(f"logits must be (num_exits, N, C), got shape {tuple(self.logits.shape)}")
        if self.labels.shape != self.logits.shape[1:2]:
            raise ValueError(f"labels must be (N,) = ({self.logits.shape[1]},), got shape {tuple(self.labels.shape)}")
        if len(self.flops) != self.logits.shape[0]:
            raise ValueError(f"flops has {len(self.flops)} values for {self.logits.shape[0]} exits")
        classes = self.logits.shape[2]
        if classes == 1:
            raise ValueError(
                "logits hold one logit per sample (C = 1): thresholds read a prediction as the argmax over classes and a confidence from "
                "a softmax, both constant over one logit; cache two-class logits instead, torch.cat([torch.zeros_like(z), z], -1) "
                "(their softmax is sigmoid(z))"
            )
        if self.labels.numel() and int(self.labels.max()) >= classes:
            raise ValueError(f"labels hold class {int(self.labels.max())}, outside [0, {classes}) for {classes}-class logits (unlabeled samples take a negative label)")

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    def confidences(self, criterion="max_prob", ensemble: bool = False) -> torch.Tensor:
        """``(E, N)`` confidence of every exit (or of the anytime ensemble) on every sample (for ``"patience"``: the streaks)."""
        if criterion == "patience":
            return patience_streaks(self.predictions(ensemble)).double()
        return torch.stack([exit_confidence(z, criterion) for z in self._outputs(ensemble)])

    def predictions(self, ensemble: bool = False) -> torch.Tensor:
        """``(E, N)`` predicted class of every exit (or anytime ensemble)."""
        return torch.stack([z.argmax(-1) for z in self._outputs(ensemble)])

    def scaled(self, temperature) -> "CachedExits":
        """The same cache with exit k's logits divided by temperature k (`calibrate_temperature`'s, or one number per exit)."""
        values = check_temperatures(temperature, self.num_exits)
        if values is None:
            return self
        t = torch.tensor(values, dtype=self.logits.dtype).view(-1, 1, 1)
        return CachedExits(self.logits / t, self.labels, self.flops, self.stages)

    def _outputs(self, ensemble) -> list[torch.Tensor]:
        from .ztw import GeometricEnsemble

        if isinstance(ensemble, GeometricEnsemble):
            check_ensemble(ensemble, self.num_exits)
            with torch.no_grad():
                return ensemble(list(self.logits))
        if not ensemble:
            return list(self.logits)
        from .ensemble import anytime_ensemble

        return anytime_ensemble(list(self.logits))


@torch.no_grad()
def collect_exit_logits(model: MultiExitModel, loader, device=None, progress: bool | None = None) -> CachedExits:
    """One pass over `loader` (batches of ``(inputs, labels, ...)``) caching every exit's logits, on the CPU.

    `progress`: True: a tqdm bar over the batches where standard error is a terminal, else a line
    on standard error at the start, at most every 10 seconds and at the end (``collecting exit
    logits, batch 40/84 (47%), 12s``); False: nothing. None (the default): the bar on a terminal,
    else the same lines through the ``timm_exits`` logger at INFO, as timm's train.py logs its
    progress: they appear where the application logs at INFO (timm's ``setup_default_logging``,
    ``logging.basicConfig(level=logging.INFO)``) and a script that never configured logging stays quiet.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"collect_exit_logits needs a MultiExitModel, got {type(model).__name__}")
    if model.num_classes == 1:  # named before the pass over the data, not after it
        raise ValueError("the model outputs one logit per sample: thresholds need class logits (CachedExits says why); early_exit takes a callable criterion instead")
    logits, labels, sizes = [], [], Counter()
    with evaluating(model):
        for batch in Progress(progress)(loader, "collecting exit logits"):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("each batch of the loader must be (inputs, labels, ...)")
            x, y = batch[0], batch[1]
            if device is not None:
                x = x.to(device)
            sizes[tuple(x.shape[1:])] += x.shape[0]
            logits.append(torch.stack([z.float().cpu() for z in model.forward_exits(x)]))
            labels.append(torch.as_tensor(y).cpu())
    if not logits:
        raise ValueError("the loader gave no batches")
    # inputs of several sizes cost what they cost: each exit's cost is the average over the samples
    costs = torch.tensor([exit_costs(model, size) for size in sizes], dtype=torch.float64)
    counts = torch.tensor(list(sizes.values()), dtype=torch.float64).unsqueeze(1)
    flops = ((costs * counts).sum(0) / counts.sum()).tolist()
    return CachedExits(torch.cat(logits, 1), torch.cat(labels), flops, list(model.stages) + ["final"])


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
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
    return _Outcome(_accuracy(preds[exit_index, torch.arange(n)], labels), (costs.double()[exit_index]).mean().item(), (counts / n).tolist())


def evaluate_thresholds(cached: CachedExits, threshold=None, criterion="max_prob", ensemble: bool = False, temperature=None, patience=None) -> Calibration:
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
    out = _outcome(scaled.confidences(criterion, ensemble), scaled.predictions(ensemble), cached.labels, torch.tensor(cached.flops), conf_thresholds)
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


def _costs(cached: CachedExits, costs) -> list[float] | None:
    """Per-exit costs in another unit (seconds from `profile_exits`), checked against `cached`; None for FLOPs."""
    if costs is None:
        return None
    from .profile import ExitProfile

    if isinstance(costs, ExitProfile):
        if costs.stages != cached.stages:
            raise ValueError(f"costs is a profile of a model with exits at {costs.stages}, the cached exits are at {cached.stages}: profile the same model")
        costs = costs.seconds
    values = costs.tolist() if isinstance(costs, torch.Tensor) else list(costs)
    if len(values) != cached.num_exits:
        raise ValueError(f"costs has {len(values)} values; give one per exit ({cached.num_exits}): what a sample leaving there costs")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"costs must be finite numbers > 0, got {values}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"costs must not decrease from exit to exit (leaving later computes more), got {values}")
    return [float(v) for v in values]


def calibrate_thresholds(cached: CachedExits, budget: float | None = None, *, max_accuracy_drop: float | None = None, delta: float | None = None,
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
    `timm_exits.risk`). `costs`: what leaving at each exit costs in another unit, such as
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
    custom = _costs(cached, costs)
    flops = torch.tensor(cached.flops, dtype=torch.float64)
    costs = torch.tensor(custom, dtype=torch.float64) if custom is not None else flops

    def run(thresholds) -> _Outcome:
        return _outcome(conf, preds, labels, costs, thresholds)

    def done(thresholds) -> Calibration:
        out = _outcome(conf, preds, labels, flops, thresholds)
        return dataclasses.replace(_calibration(thresholds, criterion, ensemble, out, temperature), cost=run(thresholds).flops if custom is not None else None)

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
    target = _accuracy(preds[-1], labels) - max_accuracy_drop
    candidates = [[math.inf] * (cached.num_exits - 1)]
    candidates += [_msdnet_thresholds(conf, q) for q in torch.logspace(-3, 3, 61, dtype=torch.float64).tolist()]
    candidates += [[t] * (cached.num_exits - 1) for t in torch.quantile(conf[:-1].flatten().double(), torch.linspace(0, 1, 101, dtype=torch.float64)).tolist()]
    outcomes = [(run(t), t) for t in candidates]
    _, best = min(((o, t) for o, t in outcomes if o.accuracy >= target - 1e-12), key=lambda pair: (pair[0].flops, -pair[0].accuracy))
    return done(best)


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
    return [AnytimePoint(k, cached.stages[k], _accuracy(preds[k], cached.labels), cached.flops[k]) for k in range(cached.num_exits)]


def budgeted_curve(cached: CachedExits, budgets: Sequence[float] | int = 20, criterion="max_prob", ensemble: bool = False, evaluate_on: CachedExits | None = None,
                   temperature=None, costs=None) -> list[CurvePoint]:
    """Accuracy against average FLOPs over a sweep of budgets (default: 20 from the first exit's cost to the full model's).

    Thresholds are calibrated on `cached` for each budget; with `evaluate_on` (say, the test
    set's cached exits) the accuracy and FLOPs are those on it, as a paper reports them.
    `temperature`: per-exit temperatures (`calibrate_temperature`), applied to both. `costs`:
    budgets in another unit (`profile_exits`' seconds); the points' FLOPs stay FLOPs.
    """
    if evaluate_on is not None and evaluate_on.num_exits != cached.num_exits:
        raise ValueError(f"evaluate_on has {evaluate_on.num_exits} exits, the calibration data {cached.num_exits}: they must come from the same model")
    if isinstance(budgets, int):
        scale = _costs(cached, costs) or cached.flops
        lo, hi = scale[0], scale[-1]
        budgets = [lo + (hi - lo) * i / (budgets - 1) for i in range(budgets)] if budgets > 1 else [hi]
    points = []
    for b in budgets:
        c = calibrate_thresholds(cached, b, criterion=criterion, ensemble=ensemble, temperature=temperature, costs=costs)
        if evaluate_on is not None:
            c = evaluate_thresholds(evaluate_on, c.thresholds, criterion, ensemble, temperature=temperature)
        points.append(CurvePoint(float(b), c.accuracy, c.flops, c.exit_shares, c.thresholds))
    return points


def plot_tradeoff(curve: Sequence[CurvePoint], path=None, anytime: Sequence[AnytimePoint] | None = None, title: str | None = None, points: dict | None = None, ax=None):
    """Draw accuracy against average FLOPs; returns the matplotlib Figure (saved to `path` too if given).

    Draws the budgeted curve, each exit alone (`anytime`, labeled "exit k") and `points`
    (``{label: (flops, accuracy)}``, other models such as the plain backbone) into `ax`, or into a
    new Figure. FLOPs are in MFLOPs or GFLOPs, whichever reads better. The accuracy axis spans at
    least 10 points, so that a difference of a few images does not look like a cliff. pyplot and
    its backend are never touched: the Figure shows in a notebook, and `path` may end in any
    format matplotlib writes (.png, .pdf, .svg).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_tradeoff needs matplotlib: pip install 'timm-exits[demo]'") from err
    if not curve:
        raise ValueError("curve is empty: pass the points of timm_exits.budgeted_curve(...)")
    path = figure_path(path, "tradeoff.png") if path is not None else None
    own = ax is None
    if own:
        fig = Figure(figsize=(6.5, 4.5))
        ax = fig.subplots()
    fig = ax.figure
    flops = [p.flops for p in curve] + [p.flops for p in anytime or []] + [f for f, _ in (points or {}).values()]
    scale, unit = (1e9, "GFLOPs") if flops and max(flops) >= 1e9 else (1e6, "MFLOPs")
    accuracies = [p.accuracy for p in curve]
    ax.plot([p.flops / scale for p in curve], [100 * p.accuracy for p in curve], "o-", ms=3, label="early exit, budgeted (MSDNet protocol)")
    if anytime:
        ax.plot([p.flops / scale for p in anytime], [100 * p.accuracy for p in anytime], "s--", label="each exit alone (anytime)")
        for p in anytime:
            ax.annotate(f"exit {p.exit + 1}", (p.flops / scale, 100 * p.accuracy), textcoords="offset points", xytext=(4, -12), fontsize=8)
        accuracies += [p.accuracy for p in anytime]
    for (label, (cost, accuracy)), marker in zip((points or {}).items(), itertools.cycle("D^vP*X")):
        ax.plot([cost / scale], [100 * accuracy], marker, ms=8, linestyle="none", label=label)
        accuracies.append(accuracy)
    if accuracies:
        low, high = 100 * min(accuracies), 100 * max(accuracies)
        pad = max(0.0, 10 - (high - low)) / 2 + 1
        bottom, top = low - pad, high + pad
        shift = max(0.0, top - 100) - max(0.0, -bottom)  # slide the window back inside [0, 100], keeping its span
        ax.set_ylim(max(0.0, bottom - shift), min(100.0, top - shift))
    ax.set_xlabel(f"average {unit} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if own:  # a figure of the caller's keeps its own layout
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
