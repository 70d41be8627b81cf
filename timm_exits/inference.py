"""Early-exit inference that stops computing for confident samples: criteria, thresholds, per-sample skipping.

`early_exit` runs a `MultiExitModel` exit by exit (`MultiExitModel.run`). After each exit, the
samples whose confidence passes that exit's threshold leave the batch; the others go on,
carrying only their own rows of the values the next step reads. The last exit takes whoever is
left. Choosing the thresholds from cached validation logits is `timm_exits.calibration`'s job.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import sys
import threading
import warnings
import weakref

import torch

from .model import MultiExitModel

__all__ = ["CRITERIA", "EarlyExitResult", "Calibration", "early_exit", "exit_confidence", "exit_costs"]

CRITERIA = ("max_prob", "entropy", "margin", "patience")


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
    if criterion == "patience":
        raise ValueError("the patience criterion reads the exits before this one (how long the prediction has held): use patience_streaks on every exit's logits")
    raise ValueError(f"unknown criterion {criterion!r}; use one of {CRITERIA} or a callable (logits) -> (B,) confidence")


def patience_streaks(predictions: torch.Tensor) -> torch.Tensor:
    """``(E, N)`` predicted classes -> for each exit, for how many consecutive exits up to it the prediction has held (1 at a change).

    The patience criterion (PBEE, Zhou et al. 2020) lets a sample leave at the first exit whose
    streak reaches the patience p: its prediction has stayed the same for p consecutive exits.
    """
    streaks = torch.ones_like(predictions, dtype=torch.long)
    for k in range(1, predictions.shape[0]):
        streaks[k] = torch.where(predictions[k] == predictions[k - 1], streaks[k - 1] + 1, 1)
    return streaks


def _streak(previous: torch.Tensor | None, streak: torch.Tensor | None, predicted: torch.Tensor) -> torch.Tensor:
    """One exit of `patience_streaks`, for the samples still running."""
    if previous is None:
        return torch.ones_like(predicted)
    return torch.where(predicted == previous, streak + 1, 1)


def check_logit_count(model: MultiExitModel, criterion) -> None:
    """A softmax over one logit is always 1: a one-logit model needs a callable criterion."""
    if model.num_classes == 1 and isinstance(criterion, str):
        raise ValueError(f"criterion={criterion!r} reads a softmax, which is always 1 over one logit (every sample would leave at exit 1); pass a callable criterion, e.g. lambda z: (z.sigmoid() - 0.5).abs().squeeze(1)")


def check_criterion(criterion) -> None:
    if not callable(criterion) and criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; use one of {CRITERIA} or a callable (logits) -> (B,) confidence")


def confidence_thresholds(threshold, criterion, num_exits: int, ensemble: bool = False) -> list[float]:
    """One threshold per early exit on the confidence scale (entropy thresholds are negated).

    A threshold no confidence of a built-in criterion can reach (a probability above 1, a
    negative entropy) or that every one passes (a negative probability) is legal but almost
    surely a slip, such as 90 for 0.9: it gets a warning. ``inf`` and ``-inf`` are deliberate.
    """
    check_criterion(criterion)
    threshold_given = threshold
    if isinstance(threshold, Calibration):
        if not callable(criterion) and threshold.criterion != criterion:
            raise ValueError(f"the calibration was made for criterion={threshold.criterion!r}, not {criterion!r}")
        if threshold.ensemble != ensemble:
            raise ValueError(f"the calibration was made with ensemble={threshold.ensemble}, not ensemble={ensemble}: its thresholds are for other scores")
        threshold = threshold.thresholds
    if isinstance(threshold, torch.Tensor) and threshold.dim() == 0:
        threshold = threshold.item()
    if isinstance(threshold, numbers.Real):  # a Python, numpy or 0-d tensor scalar
        values = [threshold]
    elif isinstance(threshold, (str, bytes)) or not hasattr(threshold, "__iter__"):
        raise ValueError(f"threshold must be a number, one number per early exit, or a Calibration; got {threshold!r}")
    else:
        values = list(threshold.tolist() if hasattr(threshold, "tolist") else threshold)
    if len(values) == 1:
        values = values * (num_exits - 1)
    if len(values) != num_exits - 1:
        raise ValueError(f"threshold has {len(values)} values; give one number or one per early exit ({num_exits - 1}: the last exit takes every sample left)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
            raise ValueError(f"thresholds must be numbers (inf allowed, NaN not), got {values}")
    values = [float(v) for v in values]
    if criterion == "patience" and not isinstance(threshold_given, Calibration):
        bad = [v for v in values if math.isfinite(v) and not (v == int(v) and 1 <= v <= num_exits - 1)]
        if bad:
            raise ValueError(
                f"patience must be a whole number of exits from 1 to {num_exits - 1} (the last exit takes every sample left; inf keeps everyone "
                f"going), got {bad[0]:g}"
            )
    _warn_unreachable(values, criterion)
    return [-v for v in values] if criterion == "entropy" else values


def check_ensemble(ensemble, num_exits: int) -> None:
    """`ensemble` is a bool (the anytime mean) or a fitted `GeometricEnsemble` of as many exits."""
    from .ztw import GeometricEnsemble

    if isinstance(ensemble, GeometricEnsemble):
        if ensemble.num_exits != num_exits:
            raise ValueError(f"the geometric ensemble was fit for {ensemble.num_exits} exits, this model has {num_exits}")
    elif not isinstance(ensemble, bool):
        raise TypeError(f"ensemble must be True (the mean of the exits so far), False, or a GeometricEnsemble (fit_geometric_ensemble), got {type(ensemble).__name__}")


def patience_threshold(threshold, criterion, patience):
    """`patience` as the threshold of the patience criterion (and only with it)."""
    if patience is None:
        return threshold
    if criterion != "patience":
        raise ValueError(f"patience={patience!r} is for criterion='patience', not criterion={criterion!r}")
    if isinstance(patience, bool) or not isinstance(patience, numbers.Integral):
        raise ValueError(f"patience must be a whole number of exits (1 = leave at the first exit), got {patience!r}")
    return int(patience)


def _warn(message: str) -> None:
    """Warn at the first line outside this package: the user's own call, however deep the library's."""
    package, frame, level = os.path.dirname(__file__), sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _warn_unreachable(values: list[float], criterion) -> None:
    if criterion in ("max_prob", "margin"):
        above = [v for v in values if 1 < v < math.inf]
        below = [v for v in values if -math.inf < v < 0]
        if above:
            _warn(
                f"threshold {above[0]:g} is above 1, the most a {criterion} confidence can be: no sample leaves at that exit "
                f"(a probability: 0.9, not 90; inf keeps everyone on purpose)"
            )
        if below:
            _warn(f"threshold {below[0]:g} is below 0: every sample leaves at that exit ({criterion} is at least 0; -inf on purpose)")
    elif criterion == "entropy":
        below = [v for v in values if -math.inf < v < 0]
        if below:
            _warn(f"entropy threshold {below[0]:g} is below 0, the least an entropy can be: no sample leaves at that exit")


# -- early exit -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    """Thresholds for `early_exit` and how they did on the data they were fit on."""

    thresholds: list[float]
    criterion: str
    ensemble: bool
    accuracy: float
    flops: float  # average per sample
    exit_shares: list[float]  # share of the samples leaving at each exit
    temperature: list[float] | None = None  # per-exit temperatures the confidences were read after (calibrate_temperature)
    cost: float | None = None  # average cost per sample in the unit of the costs calibrated with (seconds from profile_exits), if any


def calibration_temperature(threshold, temperature, num_exits: int) -> list[float] | None:
    """The temperatures to read confidences after: `temperature`, or those a `Calibration` given as `threshold` was made with.

    Both given and different is an error: the thresholds hold only on the confidences they were calibrated on.
    """
    from .temperature import check_temperatures  # lazy: temperature.py reads calibration's CachedExits

    given = check_temperatures(temperature, num_exits)
    if isinstance(threshold, Calibration) and threshold.temperature is not None:
        if given is not None and given != threshold.temperature:
            raise ValueError(f"the calibration was made with temperature={threshold.temperature}, not {given}: its thresholds are for those confidences")
        return list(threshold.temperature)
    if isinstance(threshold, Calibration) and given is not None:
        raise ValueError("the calibration was made without temperatures: calibrate again with temperature=..., or leave temperature out")
    return given


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
        if num_exits is None and self.exit_index.numel() == 0:
            return []  # no sample, no exit seen
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


def split_rows(passed: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows where `passed` holds and those where it does not, each in order, at one host read.

    How many leave must be known on the host (it sizes the next segment's batch); that count is the
    only read, and a caller that has read it already passes it as `count`. A stable sort puts the
    passing rows first, so neither list needs a ``nonzero`` of its own (on a GPU, each is a wait for
    the device).
    """
    n = int(passed.sum()) if count is None else count
    if n in (0, passed.numel()):
        rows = torch.arange(passed.numel(), device=passed.device)
        return (rows[:0], rows) if n == 0 else (rows, rows[:0])
    order = torch.argsort(passed.logical_not().to(torch.uint8), stable=True)
    return order[:n], order[n:]


def passes_nobody(threshold: float, criterion) -> bool:
    """Whether no confidence of the built-in `criterion` can reach `threshold` (on the confidence scale): ``inf``.

    Their confidences are finite (or NaN, which passes nothing), so that exit's decision is known
    without reading its logits. A callable's score may be ``inf``; patience keeps counting streaks.
    """
    return threshold == math.inf and isinstance(criterion, str) and criterion != "patience"


def _take(value, kind, rows: torch.Tensor):
    """The rows `rows` of a carried value whose batch parts are described by `kind`."""
    if kind == "batch":
        if value.dim() == 4 and not value.is_contiguous() and value.is_contiguous(memory_format=torch.channels_last):
            return value[rows]  # keeps channels_last, where index_select would hand the next segment a contiguous copy to convert back
        return value.index_select(0, rows)
    if kind == "size":
        return int(rows.numel())
    if isinstance(kind, tuple):
        return type(value)(_take(v, k, rows) for v, k in zip(value, kind))
    return value


def _contains_mixed(kind) -> bool:
    return kind == "mixed" or (isinstance(kind, tuple) and any(_contains_mixed(k) for k in kind))


class _Learned:
    """What early exit learns about one model, once: which carried values follow the batch, and what
    leaving at each exit costs for each input size.

    One per model, weakly keyed: it lives as long as the model and is never pickled or copied with
    it (a copy learns again). It is dropped when the model's steps change (a head or the backbone
    replaced). Its lock makes concurrent first calls learn each fact once.
    """

    def __init__(self, steps: list):
        self.steps = steps  # the eval steps it was learned on
        self.lock = threading.Lock()
        self.kinds: list | None = None
        self.costs: dict[tuple[int, ...], list[float]] = {}
        self.on_device: dict[tuple, torch.Tensor] = {}  # the costs as a tensor, per input size and device


_LEARNED: "weakref.WeakKeyDictionary[MultiExitModel, _Learned]" = weakref.WeakKeyDictionary()
_LEARNED_LOCK = threading.Lock()


def _learned(model: MultiExitModel) -> _Learned:
    steps = model.steps(training=False)
    with _LEARNED_LOCK:
        learned = _LEARNED.get(model)
        if learned is None or learned.steps is not steps:
            learned = _LEARNED[model] = _Learned(steps)
        return learned


def _batch_kinds(model: MultiExitModel, x: torch.Tensor) -> list:
    """For each cut, which carried values follow the batch (learned once per model on batches of 2 and 3)."""
    learned = _learned(model)
    with learned.lock:
        if learned.kinds is None:
            runs = []
            for n in (2, 3):
                run = model.run(x[:1].expand(n, *x.shape[1:]).clone())
                runs.append([run.carried for _ in run][:-1])  # what each early exit carries on
            kinds = [_slot_kinds(a, b, 2, 3) for a, b in zip(*runs)]
            for k, kind in enumerate(kinds):
                if _contains_mixed(kind):
                    raise ValueError(
                        f"early_exit cannot split the batch after exit {k + 1} ({model.stages[k]!r}): "
                        "a value carried past it mixes the batch with another dimension; choose another stage"
                    )
            learned.kinds = kinds
        return learned.kinds


def exit_costs(model: MultiExitModel, input_size: tuple[int, ...]) -> list[float]:
    """What a sample that leaves at exit k costs: the backbone up to k plus heads 0..k (learned once per input size)."""
    learned = _learned(model)
    with learned.lock:
        if input_size not in learned.costs:
            from .flops import InputSizeError, flops_report  # lazy: counting imports fvcore, which early exit needs only here

            try:
                with torch.inference_mode(False):
                    exits = flops_report(model, input_size=input_size).exits
            except InputSizeError as err:  # the caller's batch does not fit the model: the model's own message, as its forward gives it
                raise err.failure from None
            heads = itertools.accumulate(cost.head_flops for cost in exits)
            learned.costs[input_size] = [float(cost.backbone_flops + h) for cost, h in zip(exits, heads)]
        return learned.costs[input_size]


def exit_costs_on(model: MultiExitModel, input_size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`exit_costs` as a tensor on `device`, made once: a tensor built from host data is a copy, and on a GPU a wait, per call."""
    learned = _learned(model)
    key = (input_size, str(device))
    if key not in learned.on_device:  # after the first call, a dict look-up and nothing else
        costs = torch.tensor(exit_costs(model, input_size), device=device)
        with learned.lock:
            learned.on_device.setdefault(key, costs)
    return learned.on_device[key]


def early_exit(model: MultiExitModel, x: torch.Tensor, threshold=0.9, criterion="max_prob", ensemble: bool = False, temperature=None, patience=None) -> EarlyExitResult:
    """Classify `x`, each sample stopping at the first exit where it is confident enough.

    Args:
        model: a `MultiExitModel` in eval mode.
        x: the input batch.
        threshold: one number for every early exit, one per early exit (``num_exits - 1``), or a
            `Calibration`. A sample leaves at exit k when its confidence is ``>= threshold[k]``
            (for ``"entropy"``: when its entropy is ``<= threshold[k]``); ``inf`` keeps everyone
            (``-inf`` for entropy).
        criterion: ``"max_prob"``, ``"entropy"``, ``"margin"``, ``"patience"`` or a callable
            ``(logits) -> (B,)`` confidence (higher = more confident). ``"patience"`` (PBEE, Zhou et
            al. 2020): a sample leaves once its predicted class has stayed the same for `patience`
            consecutive exits (the threshold is that count).
        patience: with ``criterion="patience"``, the count (it replaces `threshold`).
        ensemble: decide on (and return) the mean logits of the exits so far instead of the
            current exit's alone (the anytime ensemble), or a fitted `GeometricEnsemble`
            (`fit_geometric_ensemble`: Zero Time Waste's learned geometric ensembling).
        temperature: one temperature per exit (`timm_exits.calibrate_temperature`): exit k's
            logits are divided by it before the criterion reads them, and returned so. A
            `Calibration` made with temperatures brings its own.

    Runs under `torch.no_grad`; only the rows of samples still in the batch are computed after
    each exit. Equivalent, per sample, to computing every exit and selecting.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"early_exit needs a MultiExitModel (timm_exits.wrap(...)), got {type(model).__name__}")
    if model.training:
        raise RuntimeError("early_exit runs in eval mode (batch norm statistics, dropout); call model.eval() first")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch tensor (B, ...), got {getattr(x, 'shape', type(x).__name__)}")
    model.check_batch(x)
    model.check_channels(x.shape[1], f"x of shape {tuple(x.shape)}")
    check_logit_count(model, criterion)
    threshold = patience_threshold(threshold, criterion, patience)
    check_ensemble(ensemble, model.num_exits)
    temperatures = calibration_temperature(threshold, temperature, model.num_exits)
    thresholds = confidence_thresholds(threshold, criterion, model.num_exits, ensemble)
    if not all(step.skips for step in model.steps()):
        _warn("this model runs through forward_intermediates (fx could not trace it): every exit is computed, then one is selected")
    with torch.no_grad():
        spent = exit_costs_on(model, tuple(x.shape[1:]), x.device)
        return _early_exit(model, x, thresholds, criterion, ensemble, spent, temperatures)


def _early_exit(model: MultiExitModel, x, thresholds, criterion, ensemble, spent, temperatures=None) -> EarlyExitResult:
    batch, last = x.shape[0], model.num_exits - 1
    kinds = _batch_kinds(model, x) if batch > 1 else None
    # Until a sample leaves, nothing is indexed: the positions of the samples still running (rows), the
    # logits and exits chosen so far are made at the first exit where one leaves; when none does, the
    # last exit's logits are the result as they come.
    rows = logits = exit_index = dtype = total = previous = streak = None
    geometric = not isinstance(ensemble, bool)
    history: list[torch.Tensor] = []  # for a geometric ensemble: the exits so far, rows of the samples still running
    run = model.run(x)
    for out in run:
        k, z = out.index, out.logits
        if temperatures is not None:
            z = z / temperatures[k]
        if geometric:
            history.append(z)
            z = ensemble.combine(history).to(z.dtype)
        elif ensemble:
            total = z.float() if total is None else total + z.float()
            z = (total / (k + 1)).to(z.dtype)
        dtype = z.dtype if dtype is None else dtype  # the result's dtype: the first exit's, as when every exit is computed and selected
        if k == last:
            if rows is None:  # a copy, as the indexed result always was: a compiled step's output buffer is reused by its next call
                logits = z.to(dtype, copy=True)
            else:
                logits[rows] = z
            break
        if criterion == "patience":
            streak = _streak(previous, streak, z.argmax(-1))
            previous = z.argmax(-1)
            passed = streak >= thresholds[k]
        elif passes_nobody(thresholds[k], criterion):
            continue  # everyone stays: no confidence to compute, nothing to read on the host
        else:
            passed = exit_confidence(z, criterion) >= thresholds[k]
        count = int(passed.sum())  # the one host read at this exit: how many leave
        if count == 0:
            continue
        leaving, staying = split_rows(passed, count)
        if rows is None:
            rows = torch.arange(batch, device=x.device)
            logits = z.new_empty(batch, z.shape[1], dtype=dtype)
            exit_index = torch.full((batch,), last, dtype=torch.long, device=x.device)
        logits[rows[leaving]] = z[leaving]
        exit_index[rows[leaving]] = k
        if staying.numel() == 0:
            break  # everyone has left: the later steps never run
        rows = rows[staying]
        run.carried = _take(run.carried, kinds[k], staying)
        if ensemble is True:
            total = total[staying]
        if geometric:
            history = [h[staying] for h in history]
        if streak is not None:
            streak, previous = streak[staying], previous[staying]
    if exit_index is None:
        exit_index = torch.full((batch,), last, dtype=torch.long, device=x.device)
    return EarlyExitResult(logits, exit_index, spent[exit_index])


_MOVED = {"CachedExits", "collect_exit_logits", "calibrate_thresholds", "evaluate_thresholds", "anytime_accuracy", "budgeted_curve", "plot_tradeoff"}


def __getattr__(name: str):
    # these lived here before calibration.py took them: old imports and pickled CachedExits still resolve
    if name in _MOVED:
        from . import calibration  # lazy: calibration imports this module

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
