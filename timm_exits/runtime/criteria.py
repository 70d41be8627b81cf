"""Confidence criteria and thresholds for early exit, and the fitted results it takes (`Calibration`, `TemperatureFit`).

The data types sit here, below the code in `timm_exits.calibration` that fits them, so that the
runtime reads them without importing the fitting code.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .._checks import real_number
from ..ensemble import GeometricEnsemble

__all__ = ["CRITERIA", "Calibration", "TemperatureFit", "exit_confidence", "check_criterion", "check_temperatures", "confidence_thresholds"]


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
    """One temperature per exit, and each exit's NLL and expected calibration error before and after, on the data it was fit on."""

    temperatures: list[float]
    nll_before: list[float]
    nll_after: list[float]
    ece_before: list[float]
    ece_after: list[float]


def check_temperatures(temperature, num_exits: int) -> list[float] | None:
    """`temperature` (a `TemperatureFit`, or one positive number per exit) as a list, or None; a clear error otherwise."""
    if temperature is None:
        return None
    values = temperature.temperatures if isinstance(temperature, TemperatureFit) else temperature
    one_per_exit = f"one positive number per exit ({num_exits}), or calibrate_temperature's result"
    if hasattr(values, "ndim") and hasattr(values, "tolist"):  # a tensor or a numpy array: one dimension, one value per exit
        if values.ndim != 1:
            raise ValueError(f"temperature must be {one_per_exit}; got {type(values).__name__} of shape {tuple(values.shape)}")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"temperature must be {one_per_exit}; got {temperature!r}")
    if len(values) != num_exits:
        raise ValueError(f"temperature has {len(values)} values; give one per exit ({num_exits}), as calibrate_temperature fits them")
    values = [real_number(v, "each temperature", "a finite number > 0") for v in values]  # Python, numpy or 0-d tensor numbers
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"temperatures must be finite numbers > 0, got {values}")
    return values


CRITERIA = ("max_prob", "entropy", "margin", "patience")


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
        raise ValueError(
            "the patience criterion reads the exits before this one (how long the prediction has held): "
            "use patience_streaks on every exit's logits"
        )
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


def next_streak(previous: torch.Tensor | None, streak: torch.Tensor | None, predicted: torch.Tensor) -> torch.Tensor:
    """One exit of `patience_streaks`, for the samples still running."""
    if previous is None:
        return torch.ones_like(predicted)
    return torch.where(predicted == previous, streak + 1, 1)


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
            raise ValueError(
                f"the calibration was made with ensemble={threshold.ensemble}, not ensemble={ensemble}: its thresholds are for other scores"
            )
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
        raise ValueError(
            f"threshold has {len(values)} values; give one number or one per early exit ({num_exits - 1}: "
            "the last exit takes every sample left)"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
            raise ValueError(f"thresholds must be numbers (inf allowed, NaN not), got {values}")
    values = [float(v) for v in values]
    if criterion == "patience" and not isinstance(threshold_given, Calibration):
        bad = [v for v in values if math.isfinite(v) and not (v == int(v) and 1 <= v <= num_exits - 1)]
        if bad:
            raise ValueError(
                f"patience must be a whole number of exits from 1 to {num_exits - 1} (the last exit takes every sample left; "
                f"inf keeps everyone going), got {bad[0]:g}"
            )
    _warn_unreachable(values, criterion)
    return [-v for v in values] if criterion == "entropy" else values


def check_ensemble(ensemble, num_exits: int) -> None:
    """`ensemble` is a bool (the anytime mean) or a fitted `GeometricEnsemble` of as many exits."""
    if isinstance(ensemble, GeometricEnsemble):
        if ensemble.num_exits != num_exits:
            raise ValueError(f"the geometric ensemble was fit for {ensemble.num_exits} exits, this model has {num_exits}")
    elif not isinstance(ensemble, bool):
        raise TypeError(
            "ensemble must be True (the mean of the exits so far), False, or a GeometricEnsemble (fit_geometric_ensemble), "
            f"got {type(ensemble).__name__}"
        )


def patience_threshold(threshold, criterion, patience):
    """`patience` as the threshold of the patience criterion (and only with it)."""
    if patience is None:
        return threshold
    if criterion != "patience":
        raise ValueError(f"patience={patience!r} is for criterion='patience', not criterion={criterion!r}")
    if isinstance(patience, bool) or not isinstance(patience, numbers.Integral):
        raise ValueError(f"patience must be a whole number of exits (1 = leave at the first exit), got {patience!r}")
    return int(patience)


def warn_at_caller(message: str) -> None:
    """Warn at the first line outside this package: the user's own call, however deep the library's."""
    package = os.path.dirname(os.path.dirname(__file__)) + os.sep  # timm_exits/, from timm_exits/runtime/
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _warn_unreachable(values: list[float], criterion) -> None:
    if criterion in ("max_prob", "margin"):
        above = [v for v in values if 1 < v < math.inf]
        below = [v for v in values if -math.inf < v < 0]
        if above:
            warn_at_caller(
                f"threshold {above[0]:g} is above 1, the most a {criterion} confidence can be: no sample leaves at that exit "
                f"(a probability: 0.9, not 90; inf keeps everyone on purpose)"
            )
        if below:
            warn_at_caller(
                f"threshold {below[0]:g} is below 0: every sample leaves at that exit ({criterion} is at least 0; -inf on purpose)"
            )
    elif criterion == "entropy":
        below = [v for v in values if -math.inf < v < 0]
        if below:
            warn_at_caller(f"entropy threshold {below[0]:g} is below 0, the least an entropy can be: no sample leaves at that exit")


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

    def save(self, path) -> Path:
        """Write this calibration to `path` as JSON, for `Calibration.load` and ``timm-exits export-onnx --calibration``.

        ``inf`` thresholds are written as JSON's ``Infinity``, which Python's json reads back.
        """
        if not isinstance(self.ensemble, bool):
            raise ValueError(
                "a calibration made with a GeometricEnsemble cannot be saved as JSON (the ensemble is a module with weights): "
                "keep it in Python, or torch.save the ensemble beside the thresholds"
            )
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> Calibration:
        """The calibration `Calibration.save` wrote to `path`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        needed = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a calibration Calibration.save wrote: it is not JSON ({err})") from None
        if not isinstance(data, dict) or not needed <= set(data) <= fields:
            has = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{path} is not a calibration Calibration.save wrote: it needs the keys {sorted(needed)} (and may have "
                f"{sorted(fields - needed)}); it has {has}"
            )
        return cls(**data)


def calibration_temperature(threshold, temperature, num_exits: int) -> list[float] | None:
    """The temperatures to read confidences after: `temperature`, or those a `Calibration` given as `threshold` was made with.

    Both given and different is an error: the thresholds hold only on the confidences they were calibrated on.
    """
    given = check_temperatures(temperature, num_exits)
    if isinstance(threshold, Calibration) and threshold.temperature is not None:
        if given is not None and given != threshold.temperature:
            raise ValueError(
                f"the calibration was made with temperature={threshold.temperature}, not {given}: its thresholds are for those confidences"
            )
        return list(threshold.temperature)
    if isinstance(threshold, Calibration) and given is not None:
        raise ValueError("the calibration was made without temperatures: calibrate again with temperature=..., or leave temperature out")
    return given


def exit_rule(model, threshold, criterion, ensemble, temperature, patience) -> tuple[list[float], list[float] | None]:
    """`early_exit`'s arguments checked against `model`: the thresholds on the confidence scale, and the temperatures (or None)."""
    check_logit_count(model, criterion)
    threshold = patience_threshold(threshold, criterion, patience)
    check_ensemble(ensemble, model.num_exits)
    temperatures = calibration_temperature(threshold, temperature, model.num_exits)
    return confidence_thresholds(threshold, criterion, model.num_exits, ensemble), temperatures


def passes_nobody(threshold: float, criterion) -> bool:
    """Whether no confidence of the built-in `criterion` can reach `threshold` (on the confidence scale): ``inf``.

    Their confidences are finite (or NaN, which passes nothing), so that exit's decision is known
    without reading its logits. A callable's score may be ``inf``; patience keeps counting streaks.
    """
    return threshold == math.inf and isinstance(criterion, str) and criterion != "patience"


def check_logit_count(model, criterion) -> None:
    """A softmax over one logit is always 1: a one-logit model needs a callable criterion."""
    if model.num_classes == 1 and isinstance(criterion, str):
        raise ValueError(
            f"criterion={criterion!r} reads a softmax, which is always 1 over one logit (every sample would leave at exit 1); "
            "pass a callable criterion, e.g. lambda z: (z.sigmoid() - 0.5).abs().squeeze(1)"
        )
