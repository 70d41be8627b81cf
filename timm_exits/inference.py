"""Early-exit inference that stops computing for confident samples, and choosing its thresholds.

`early_exit` runs a `MultiExitModel` segment by segment. After each exit, the samples whose
confidence passes that exit's threshold leave the batch; the others go on, carrying only their
own rows of the values the next segment reads. The last exit takes whoever is left.

Thresholds come from cached validation logits (`collect_exit_logits`): `calibrate_thresholds`
meets an average-FLOPs budget with MSDNet's budgeted-batch protocol (Huang et al. 2018), or a
target accuracy at the least FLOPs. `anytime_accuracy` and `budgeted_curve` give the trade-off as
data, `plot_tradeoff` as a PNG.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import NamedTuple, Sequence

import torch

from .model import MultiExitModel

__all__ = [
    "CRITERIA",
    "EarlyExitResult",
    "early_exit",
    "exit_confidence",
    "all_exit_logits",
    "CachedExits",
    "collect_exit_logits",
    "Calibration",
    "calibrate_thresholds",
    "evaluate_thresholds",
    "anytime_accuracy",
    "budgeted_curve",
    "plot_tradeoff",
]

CRITERIA = ("max_prob", "entropy", "margin")


# -- criteria and thresholds ------------------------------------------------------------------------


def exit_confidence(logits: torch.Tensor, criterion="max_prob") -> torch.Tensor:
    """``(B,)`` confidence of ``(B, C)`` logits, higher = more confident.

    ``"max_prob"``: the top softmax probability; ``"margin"``: top minus second probability;
    ``"entropy"``: minus the entropy of the softmax (so that a sample passes a threshold ``t``
    on the entropy when ``-H >= -t``); a callable ``(logits) -> (B,)`` score is used as it is.
    """
    if callable(criterion):
        score = criterion(logits)
        if not isinstance(score, torch.Tensor) or tuple(score.shape) != (logits.shape[0],):
            got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
            raise ValueError(f"the criterion callable must return one score per sample, shape ({logits.shape[0]},); it returned {got}")
        return score.float()
    probs = logits.float().softmax(-1)
    if criterion == "max_prob":
        return probs.amax(-1)
    if criterion == "margin":
        top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)
    if criterion == "entropy":
        return (probs * probs.clamp_min(1e-12).log()).sum(-1)
    raise ValueError(f"unknown criterion {criterion!r}; use one of {CRITERIA} or a callable (logits) -> (B,) confidence")


def _check_criterion(criterion) -> None:
    if not callable(criterion) and criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; use one of {CRITERIA} or a callable (logits) -> (B,) confidence")


def _confidence_thresholds(threshold, criterion, num_exits: int) -> list[float]:
    """One threshold per early exit on the confidence scale (entropy thresholds are negated)."""
    _check_criterion(criterion)
    if isinstance(threshold, Calibration):
        if not callable(criterion) and threshold.criterion != criterion:
            raise ValueError(f"the calibration was made for criterion={threshold.criterion!r}, not {criterion!r}")
        threshold = threshold.thresholds
    values = [threshold] if isinstance(threshold, (int, float)) else list(threshold.tolist() if isinstance(threshold, torch.Tensor) else threshold)
    if len(values) == 1:
        values = values * (num_exits - 1)
    if len(values) != num_exits - 1:
        raise ValueError(f"threshold has {len(values)} values; give one number or one per early exit ({num_exits - 1}: the last exit takes every sample left)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"thresholds must be numbers (inf allowed, NaN not), got {values}")
    return [-float(v) for v in values] if criterion == "entropy" else [float(v) for v in values]


# -- early exit -------------------------------------------------------------------------------------


@dataclasses.dataclass
class EarlyExitResult:
    """What `early_exit` returns, one row per sample.

    ``logits (B, C)`` from the exit each sample took (or the ensemble of the exits up to it),
    ``exit_index (B,)`` counting from 0 like ``model(x)[k]``, and ``flops (B,)``: what each
    sample cost, the backbone up to its exit plus every head it was scored by (fvcore's
    convention, as in `flops_report`).
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    flops: torch.Tensor

    def exit_counts(self, num_exits: int | None = None) -> list[int]:
        """How many samples left at each exit."""
        n = num_exits or int(self.exit_index.max().item()) + 1
        return torch.bincount(self.exit_index.cpu(), minlength=n).tolist()


def _slot_kinds(a, b, na: int, nb: int):
    """Compare a carried value at batch sizes `na` and `nb`: which parts follow the batch."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() == 0 or a.shape[1:] != b.shape[1:]:
            return "same" if a.shape == b.shape else "mixed"
        if a.shape[0] == na and b.shape[0] == nb:
            return "batch"
        return "same" if a.shape[0] == b.shape[0] else "mixed"
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        return "size" if (a, b) == (na, nb) else "same"
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return tuple(_slot_kinds(x, y, na, nb) for x, y in zip(a, b))
    return "same"


def _take(value, kind, rows: torch.Tensor):
    """The rows `rows` of a carried value whose batch parts are described by `kind`."""
    if kind == "batch":
        return value.index_select(0, rows)
    if kind == "size":
        return int(rows.numel())
    if isinstance(kind, tuple):
        return type(value)(_take(v, k, rows) for v, k in zip(value, kind))
    return value


def _contains_mixed(kind) -> bool:
    return kind == "mixed" or (isinstance(kind, tuple) and any(_contains_mixed(k) for k in kind))


def _batch_kinds(model: MultiExitModel, x: torch.Tensor) -> list:
    """For each cut, which carried values follow the batch (learned once per model on batches of 2 and 3)."""
    cached = model.__dict__.get("_carried_kinds")
    if cached is not None and cached[0] is model.backbone:
        return cached[1]
    runs = []
    for n in (2, 3):
        sample = x[:1].expand(n, *x.shape[1:]).clone()
        state, states = (sample,), []
        for segment in model.segments()[:-1]:
            _, state = segment(*state)
            states.append(state)
        runs.append(states)
    kinds = [_slot_kinds(a, b, 2, 3) for a, b in zip(*runs)]
    for k, kind in enumerate(kinds):
        if _contains_mixed(kind):
            raise ValueError(f"early_exit cannot split the batch after exit {k + 1} ({model.stages[k]!r}): a value carried past it mixes the batch with another dimension; choose another stage")
    model.__dict__["_carried_kinds"] = (model.backbone, kinds)
    return kinds


def _spent_flops(model: MultiExitModel, input_size: tuple[int, ...]) -> list[float]:
    """What a sample that leaves at exit k costs: backbone up to k plus heads 0..k (cached per input size)."""
    cache = model.__dict__.setdefault("_spent_flops", {})
    if input_size not in cache:
        from .flops import flops_report

        with torch.inference_mode(False):
            exits = flops_report(model, input_size=input_size).exits
        heads = 0.0
        spent = []
        for cost in exits:
            heads += cost.head_flops
            spent.append(float(cost.backbone_flops + heads))
        cache[input_size] = spent
    return cache[input_size]


def early_exit(model: MultiExitModel, x: torch.Tensor, threshold=0.9, criterion="max_prob", ensemble: bool = False) -> EarlyExitResult:
    """Classify `x`, each sample stopping at the first exit where it is confident enough.

    Args:
        model: a `MultiExitModel` in eval mode.
        x: the input batch.
        threshold: one number for every early exit, one per early exit (``num_exits - 1``), or a
            `Calibration`. A sample leaves at exit k when its confidence is ``>= threshold[k]``
            (for ``"entropy"``: when its entropy is ``<= threshold[k]``); ``inf`` keeps everyone.
        criterion: ``"max_prob"``, ``"entropy"``, ``"margin"`` or a callable ``(logits) -> (B,)``
            confidence (higher = more confident).
        ensemble: decide on (and return) the mean logits of the exits so far instead of the
            current exit's alone (the anytime ensemble).

    Runs under `torch.no_grad`; only the rows of samples still in the batch are computed after
    each exit. Equivalent, per sample, to computing every exit and selecting.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"early_exit needs a MultiExitModel (timm_exits.wrap(...)), got {type(model).__name__}")
    if model.training:
        raise RuntimeError("early_exit runs in eval mode (batch norm statistics, dropout); call model.eval() first")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch tensor (B, ...), got {getattr(x, 'shape', type(x).__name__)}")
    thresholds = _confidence_thresholds(threshold, criterion, model.num_exits)
    with torch.no_grad():
        spent = torch.tensor(_spent_flops(model, tuple(x.shape[1:])), device=x.device)
        if model._plan.feature_indices is not None:
            warnings.warn("this model runs through forward_intermediates (fx could not trace it): every exit is computed, then one is selected", stacklevel=2)
            return _select(all_exit_logits(model, x), thresholds, criterion, ensemble, spent)
        return _early_exit(model, x, thresholds, criterion, ensemble, spent)


def _early_exit(model, x, thresholds, criterion, ensemble, spent) -> EarlyExitResult:
    segments, batch = model.segments(), x.shape[0]
    kinds = _batch_kinds(model, x) if batch > 1 else None
    rows = torch.arange(batch, device=x.device)  # original positions of the samples still running
    exit_index = torch.full((batch,), model.num_exits - 1, dtype=torch.long, device=x.device)
    logits = total = None
    state: tuple = (x,)
    for k, (segment, head) in enumerate(zip(segments[:-1], model.exits)):
        feature, state = segment(*state)
        z = head(feature)
        if ensemble:
            total = z.float() if total is None else total + z.float()
            z = (total / (k + 1)).to(z.dtype)
        if logits is None:
            logits = z.new_empty(batch, z.shape[1])
        passed = exit_confidence(z, criterion) >= thresholds[k]
        leaving = passed.nonzero().squeeze(1)
        if leaving.numel() == 0:
            continue
        logits[rows[leaving]] = z[leaving]
        exit_index[rows[leaving]] = k
        if leaving.numel() == rows.numel():
            return EarlyExitResult(logits, exit_index, spent[exit_index])
        staying = (~passed).nonzero().squeeze(1)
        rows = rows[staying]
        state = _take(state, kinds[k], staying)
        if ensemble:
            total = total[staying]
    out, _ = segments[-1](*state)
    z = out if isinstance(out, torch.Tensor) else out[0]
    if ensemble and total is not None:
        z = ((total + z.float()) / model.num_exits).to(z.dtype)
    logits[rows] = z  # allocated at the first exit: every model has at least one before the last
    return EarlyExitResult(logits, exit_index, spent[exit_index])


def all_exit_logits(model: MultiExitModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's logits, whatever the model's ``eval_output`` says."""
    mode, model.eval_output = model.eval_output, "all"
    try:
        return model(x)
    finally:
        model.eval_output = mode


def _select(outputs: list[torch.Tensor], thresholds, criterion, ensemble, spent) -> EarlyExitResult:
    """Every exit computed: take, per sample, the first exit that passes (the reference behaviour)."""
    if ensemble:
        from .ensemble import anytime_ensemble

        outputs = anytime_ensemble(outputs)
    stacked = torch.stack(outputs)  # (E, B, C)
    passed = torch.stack([exit_confidence(z, criterion) >= t for z, t in zip(outputs[:-1], thresholds)] + [torch.ones_like(outputs[0][:, 0], dtype=torch.bool)])
    exit_index = passed.float().argmax(0)
    logits = stacked[exit_index, torch.arange(stacked.shape[1], device=stacked.device)]
    return EarlyExitResult(logits, exit_index, spent[exit_index])


# -- cached logits, calibration and curves ----------------------------------------------------------


@dataclasses.dataclass
class CachedExits:
    """Every exit's logits on a dataset, its labels, and what leaving at each exit costs.

    ``logits (E, N, C)``, ``labels (N,)``, ``flops`` (E values: backbone up to exit k plus heads
    0..k, per sample, as `early_exit` spends them) and the exits' ``stages``.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    flops: list[float]
    stages: list[str]

    def __post_init__(self):
        if self.logits.dim() != 3:
            raise ValueError(f"logits must be (num_exits, N, C), got shape {tuple(self.logits.shape)}")
        if self.labels.shape != self.logits.shape[1:2]:
            raise ValueError(f"labels must be (N,) = ({self.logits.shape[1]},), got shape {tuple(self.labels.shape)}")
        if len(self.flops) != self.logits.shape[0]:
            raise ValueError(f"flops has {len(self.flops)} values for {self.logits.shape[0]} exits")

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    def confidences(self, criterion="max_prob", ensemble: bool = False) -> torch.Tensor:
        """``(E, N)`` confidence of every exit (or of the anytime ensemble) on every sample."""
        return torch.stack([exit_confidence(z, criterion) for z in self._outputs(ensemble)])

    def predictions(self, ensemble: bool = False) -> torch.Tensor:
        """``(E, N)`` predicted class of every exit (or anytime ensemble)."""
        return torch.stack([z.argmax(-1) for z in self._outputs(ensemble)])

    def _outputs(self, ensemble: bool) -> list[torch.Tensor]:
        if not ensemble:
            return list(self.logits)
        from .ensemble import anytime_ensemble

        return anytime_ensemble(list(self.logits))


@torch.no_grad()
def collect_exit_logits(model: MultiExitModel, loader, device=None) -> CachedExits:
    """One pass over `loader` (batches of ``(inputs, labels, ...)``) caching every exit's logits, on the CPU."""
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"collect_exit_logits needs a MultiExitModel, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    logits, labels, size = [], [], None
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("each batch of the loader must be (inputs, labels, ...)")
            x, y = batch[0], batch[1]
            if device is not None:
                x = x.to(device)
            size = tuple(x.shape[1:])
            logits.append(torch.stack([z.float().cpu() for z in all_exit_logits(model, x)]))
            labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("the loader gave no batches")
    return CachedExits(torch.cat(logits, 1), torch.cat(labels), _spent_flops(model, size), list(model.stages) + ["final"])


@dataclasses.dataclass
class Calibration:
    """Thresholds for `early_exit` and how they did on the data they were fit on."""

    thresholds: list[float]
    criterion: str
    ensemble: bool
    accuracy: float
    flops: float  # average per sample
    exit_shares: list[float]  # share of the samples leaving at each exit


class _Outcome(NamedTuple):
    accuracy: float
    flops: float
    exit_shares: list[float]


def _outcome(conf: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor, costs: torch.Tensor, thresholds: Sequence[float]) -> _Outcome:
    """Accuracy, average FLOPs and exit shares of confidence thresholds on cached exits."""
    num_exits, n = conf.shape
    passed = torch.cat([conf[:-1] >= torch.tensor(thresholds, dtype=conf.dtype).unsqueeze(1), torch.ones(1, n, dtype=torch.bool)])
    exit_index = passed.float().argmax(0)
    correct = preds[exit_index, torch.arange(n)] == labels
    counts = torch.bincount(exit_index, minlength=num_exits).double()
    return _Outcome(correct.double().mean().item(), (costs.double()[exit_index]).mean().item(), (counts / n).tolist())


def evaluate_thresholds(cached: CachedExits, threshold, criterion="max_prob", ensemble: bool = False) -> Calibration:
    """Accuracy, average FLOPs and exit shares of `threshold` on cached exits (what `early_exit` would do)."""
    conf_thresholds = _confidence_thresholds(threshold, criterion, cached.num_exits)
    out = _outcome(cached.confidences(criterion, ensemble), cached.predictions(ensemble), cached.labels, torch.tensor(cached.flops), conf_thresholds)
    return _calibration(conf_thresholds, criterion, ensemble, out)


def _calibration(conf_thresholds, criterion, ensemble, out: _Outcome) -> Calibration:
    user = [-t for t in conf_thresholds] if criterion == "entropy" else list(conf_thresholds)
    return Calibration(user, criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "callable"), ensemble, out.accuracy, out.flops, out.exit_shares)


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


def calibrate_thresholds(cached: CachedExits, budget: float | None = None, *, max_accuracy_drop: float | None = None, criterion="max_prob", ensemble: bool = False) -> Calibration:
    """Thresholds that meet an average-FLOPs `budget`, or lose at most `max_accuracy_drop` at the least FLOPs.

    With `budget` (FLOPs per sample, between the first exit's cost and the full model's), the
    thresholds follow MSDNet's budgeted-batch protocol: a share of the samples proportional to
    ``q^k`` leaves at exit k, the most confident first, with the largest ``q`` whose average
    cost on `cached` is within the budget. With `max_accuracy_drop` (a fraction: 0.01 = one
    point below the last exit's accuracy), the cheapest of MSDNet's thresholds and of single
    shared thresholds (SDN's rule) that stays within the drop. Returns a `Calibration` whose
    ``thresholds`` `early_exit` takes as they are.
    """
    if (budget is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one of budget (average FLOPs per sample) or max_accuracy_drop")
    _check_criterion(criterion)
    conf, preds, labels = cached.confidences(criterion, ensemble), cached.predictions(ensemble), cached.labels
    costs = torch.tensor(cached.flops, dtype=torch.float64)

    def run(thresholds) -> _Outcome:
        return _outcome(conf, preds, labels, costs, thresholds)

    if budget is not None:
        lo_cost, hi_cost = costs[0].item(), costs[-1].item()
        if not isinstance(budget, (int, float)) or math.isnan(budget) or not lo_cost <= budget <= hi_cost:
            raise ValueError(f"budget must be an average FLOPs per sample between the first exit's cost ({lo_cost:,.0f}) and the full model's ({hi_cost:,.0f}), got {budget!r}")
        never = [math.inf] * (cached.num_exits - 1)
        if run(never).flops <= budget:  # the whole model fits
            return _calibration(never, criterion, ensemble, run(never))
        best = [-math.inf] * (cached.num_exits - 1)  # everyone leaves at exit 1: the budget's floor
        lo, hi = math.log(1e-4), math.log(1e4)  # log q: the larger q, the later samples leave
        for _ in range(50):
            mid = (lo + hi) / 2
            thresholds = _msdnet_thresholds(conf, math.exp(mid))
            if run(thresholds).flops <= budget:
                lo, best = mid, thresholds
            else:
                hi = mid
        return _calibration(best, criterion, ensemble, run(best))
    if not isinstance(max_accuracy_drop, (int, float)) or math.isnan(max_accuracy_drop) or not 0 <= max_accuracy_drop <= 1:
        raise ValueError(f"max_accuracy_drop must be a fraction in [0, 1] (0.01 = one point), got {max_accuracy_drop!r}")
    target = (preds[-1] == labels).double().mean().item() - max_accuracy_drop
    candidates = [[math.inf] * (cached.num_exits - 1)]
    candidates += [_msdnet_thresholds(conf, q) for q in torch.logspace(-3, 3, 61, dtype=torch.float64).tolist()]
    candidates += [[t] * (cached.num_exits - 1) for t in torch.quantile(conf[:-1].flatten().double(), torch.linspace(0, 1, 101, dtype=torch.float64)).tolist()]
    outcomes = [(run(t), t) for t in candidates]
    out, best = min(((o, t) for o, t in outcomes if o.accuracy >= target - 1e-12), key=lambda pair: (pair[0].flops, -pair[0].accuracy))
    return _calibration(best, criterion, ensemble, out)


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
    return [AnytimePoint(k, cached.stages[k], (preds[k] == cached.labels).double().mean().item(), cached.flops[k]) for k in range(cached.num_exits)]


def budgeted_curve(cached: CachedExits, budgets: Sequence[float] | int = 20, criterion="max_prob", ensemble: bool = False, evaluate_on: CachedExits | None = None) -> list[CurvePoint]:
    """Accuracy against average FLOPs over a sweep of budgets (default: 20 from the first exit's cost to the full model's).

    Thresholds are calibrated on `cached` for each budget; with `evaluate_on` (say, the test
    set's cached exits) the accuracy and FLOPs are those on it, as a paper reports them.
    """
    if evaluate_on is not None and evaluate_on.num_exits != cached.num_exits:
        raise ValueError(f"evaluate_on has {evaluate_on.num_exits} exits, the calibration data {cached.num_exits}: they must come from the same model")
    if isinstance(budgets, int):
        lo, hi = cached.flops[0], cached.flops[-1]
        budgets = [lo + (hi - lo) * i / (budgets - 1) for i in range(budgets)] if budgets > 1 else [hi]
    points = []
    for b in budgets:
        c = calibrate_thresholds(cached, b, criterion=criterion, ensemble=ensemble)
        if evaluate_on is not None:
            c = evaluate_thresholds(evaluate_on, c.thresholds, criterion, ensemble)
        points.append(CurvePoint(float(b), c.accuracy, c.flops, c.exit_shares, c.thresholds))
    return points


def plot_tradeoff(curve: Sequence[CurvePoint], path, anytime: Sequence[AnytimePoint] | None = None, title: str | None = None) -> str:
    """Write accuracy against average FLOPs (the budgeted curve, and the exits' anytime points) to a PNG; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_tradeoff needs matplotlib: pip install 'timm-exits[demo]'") from err
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p.flops / 1e6 for p in curve], [100 * p.accuracy for p in curve], "o-", label="early exit, budgeted (MSDNet protocol)")
    if anytime:
        ax.plot([p.flops / 1e6 for p in anytime], [100 * p.accuracy for p in anytime], "s--", label="each exit alone (anytime)")
    ax.set_xlabel("average MFLOPs per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
