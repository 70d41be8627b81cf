"""One call that evaluates a wrapped model over a loader: every exit alone, early exit at calibrated thresholds, and its speedup.

`evaluate_exits` strings together what an evaluation of a multi-exit model is made of:
`collect_exit_logits` on the data, `flops_report` for what each exit costs,
`calibrate_thresholds` (MSDNet's budgeted batch) on held-out data, `evaluate_thresholds` on the
evaluated data, and, when asked, `profile_exits` timing the plain backbone and early exit in the
same rounds, so that measured and predicted speedups share the machine's state.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections import Counter
from collections.abc import Sequence

import torch
from tabulate import tabulate

from .._checks import positive_int, real_number
from ..cost.flops import flops_report
from ..cost.profile import ExitProfile, profile_exits
from ..fx.modes import evaluating
from ..model import MultiExitModel
from ..runtime.criteria import Calibration, check_criterion
from .cached import CachedExits, collect_exit_logits
from .curves import anytime_accuracy
from .thresholds import calibrate_thresholds, evaluate_thresholds

__all__ = ["ExitAccuracy", "ExitEvaluation", "OperatingPoint", "evaluate_exits"]

DEFAULT_BUDGETS = 3


@dataclasses.dataclass(frozen=True)
class ExitAccuracy:
    """One exit taken alone: its accuracy on the evaluated data and what reaching it costs.

    ``flops`` per image is the backbone up to the exit plus the exit's own head, as `flops_report`
    counts it (averaged over the input sizes the loader gave); ``share`` is that over the plain
    backbone's FLOPs (the last exit is the backbone: 1). ``index`` counts from 0, like ``model(x)[index]``.
    """

    index: int
    stage: str
    accuracy: float
    flops: float
    share: float


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """Early exit at one set of thresholds, on the evaluated data.

    ``budget`` is the average-FLOPs budget the thresholds were calibrated for (None for thresholds
    given as they are); ``calibration`` is that fit, made on the calibration data, which
    ``model.early_exit(x, threshold=point.calibration)`` takes. ``flops`` is the average per image
    (every head a sample was scored by included), ``share`` that over the plain backbone's FLOPs,
    ``exit_shares`` the share of the images leaving at each exit. Speedups are over the plain
    backbone: ``flops_predicted_speedup`` from FLOPs always; ``measured_speedup`` (timed) and
    ``time_predicted_speedup`` (from each segment's measured time, `ExitProfile.predicted_speedup`)
    only with ``speedup=True``, else None.
    """

    budget: float | None
    thresholds: list[float]
    accuracy: float
    flops: float
    share: float
    exit_shares: list[float]
    flops_predicted_speedup: float
    measured_speedup: float | None = None
    time_predicted_speedup: float | None = None
    calibration: Calibration | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class ExitEvaluation:
    """What `evaluate_exits` found: ``exits`` (one `ExitAccuracy` per exit) and ``points`` (one `OperatingPoint` per budget or threshold).

    ``print(evaluation)`` shows both as tables (`table`), with the notes a reader needs: where the
    thresholds were calibrated and, without held-out data (``calibrated_on_evaluated_data``), that
    the early-exit accuracies are optimistic. ``profile`` is the `ExitProfile` the speedups come
    from (None without ``speedup=True``), timed on ``timed_images`` images.
    """

    model: str
    criterion: str
    images: int
    exits: list[ExitAccuracy]
    points: list[OperatingPoint]
    backbone_flops: float
    calibration_images: int | None = None
    calibrated_on_evaluated_data: bool = False
    timed_images: int | None = None
    profile: ExitProfile | None = dataclasses.field(default=None, repr=False)

    def table(self, tablefmt: str = "plain") -> str:
        """Both tables and their notes as text; `tablefmt` is tabulate's (``"github"`` for markdown)."""
        scale, unit = (1e9, "GFLOPs") if self.backbone_flops >= 1e9 else (1e6, "MFLOPs")
        lines = [f"{self.model}: each exit alone, on {self.images} images"]
        rows = [[str(e.index + 1), e.stage, f"{e.accuracy:.4f}", f"{e.flops / scale:.4g}", f"{e.share:.1%}"] for e in self.exits]
        header = ["exit", "attached after", "accuracy", f"{unit} per image", "share of the backbone"]
        align = ["right", "left", "right", "right", "right"]
        lines.append(tabulate(rows, header, tablefmt=tablefmt, disable_numparse=True, colalign=align))
        if not self.points:
            return "\n".join(lines)
        lines += ["", f"early exit ({self.criterion}) on the same {self.images} images"]
        header = ["budget " + unit, "thresholds", "accuracy", f"avg {unit}", "FLOPs-predicted"]  # its share: 1 / FLOPs-predicted
        timed = self.profile is not None
        if timed:
            header += ["measured", "time-predicted"]
        header.append("leaving at exit " + " / ".join(str(e.index + 1) for e in self.exits))
        rows = []
        for p in self.points:
            row = ["-" if p.budget is None else f"{p.budget / scale:.4g}", " ".join(f"{t:.3g}" for t in p.thresholds), f"{p.accuracy:.4f}",
                   f"{p.flops / scale:.4g}", f"{p.flops_predicted_speedup:.2f}x"]
            if timed:
                row += [f"{p.measured_speedup:.2f}x", f"{p.time_predicted_speedup:.2f}x"]
            rows.append(row + [" / ".join(f"{s:.0%}" for s in p.exit_shares)])
        lines.append(tabulate(rows, header, tablefmt=tablefmt, disable_numparse=True, colalign=["right"] * (len(header) - 1) + ["left"]))
        if any(p.budget is not None for p in self.points):
            if self.calibrated_on_evaluated_data:
                lines.append(f"thresholds calibrated on the evaluated {self.images} images themselves (no calibrate_on): "
                             "these accuracies are optimistic; pass calibrate_on=a held-out loader")
            else:
                lines.append(f"thresholds calibrated on calibrate_on's {self.calibration_images} images (MSDNet's budgeted batch)")
        if timed:
            timed = "all" if self.timed_images == self.images else f"the first {self.timed_images} of the"
            lines.append(f"speedup over the plain backbone: measured on {timed} {self.images} images at batch {self.profile.batch_size} "
                         f"(median of {self.profile.repeats} alternating rounds, profile_exits),")
            lines.append(f"time-predicted from each segment's measured time on the first batch, "
                         f"FLOPs-predicted from the average FLOPs on all {self.images}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Batches:
    """Iterates a loader for `collect_exit_logits`, counting batches and images per input size and keeping the first `keep` inputs."""

    def __init__(self, loader, keep: int = 0):
        self.loader, self.keep = loader, keep
        self.count, self.sizes, self.kept, self.ended = 0, Counter(), [], False

    def __len__(self) -> int:  # the progress bar's total, where the loader has one (a TypeError where not, as len's)
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.count += 1
            if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() >= 2:
                self.sizes[tuple(batch[0].shape[1:])] += batch[0].shape[0]
                if len(self.kept) < self.keep:
                    self.kept.append(batch[0])
            yield batch
        self.ended = True  # the loader itself ran out (an error raised before then is not "no batches")


def _collect(model, loader, name: str, device, progress, keep: int = 0) -> tuple[CachedExits, _Batches]:
    """`collect_exit_logits` over the loader given as argument `name`, which an error names."""
    if isinstance(loader, torch.Tensor) or not hasattr(loader, "__iter__"):
        got = f"a tensor of shape {tuple(loader.shape)}" if isinstance(loader, torch.Tensor) else type(loader).__name__
        raise TypeError(f"{name} must be an iterable of (inputs, labels) batches, such as a DataLoader; got {got} "
                        "(for tensors: DataLoader(TensorDataset(x, y), batch_size=64))")
    try:
        empty = len(loader) == 0
    except TypeError:  # a DataLoader over an IterableDataset has __len__ but no length
        empty = False
    if empty:
        raise ValueError(f"{name} is empty (len({name}) == 0): give a loader with at least one (inputs, labels) batch")
    batches = _Batches(loader, keep)
    try:
        cached = collect_exit_logits(model, batches, device=device, progress=progress)
    except ValueError as err:
        if batches.count == 0 and batches.ended:
            raise ValueError(f"{name} gave no batches: give a loader with at least one (inputs, labels) batch") from None
        raise ValueError(f"{name}: {err}") from err
    return cached, batches


BUDGETS = "a count >= 1 or a list of average FLOPs per image (between the first exit's cost and the full model's)"


def _budget_values(budgets, thresholds) -> int | list[float]:
    """`budgets` as a count or a list of numbers, checked before the pass over the data (their range needs its costs)."""
    if budgets is None:
        return DEFAULT_BUDGETS if thresholds is None else []
    if isinstance(budgets, numbers.Integral) and not isinstance(budgets, bool):
        if budgets < 1:
            raise ValueError(f"budgets must be {BUDGETS}; got {budgets!r} (leave it None to give only thresholds)")
        return int(budgets)
    if isinstance(budgets, (str, bytes)) or not hasattr(budgets, "__iter__"):
        raise ValueError(f"budgets must be {BUDGETS}; got {budgets!r}")
    values = list(budgets.tolist() if hasattr(budgets, "tolist") else budgets)
    if not values:
        raise ValueError(f"budgets is empty: give {BUDGETS}")
    return [real_number(b, f"budgets[{i}]", BUDGETS) for i, b in enumerate(values)]


def _budgets(budgets: int | list[float], calibration: CachedExits) -> list[float]:
    """The FLOPs budgets to calibrate for: that many spread between the first exit's cost and the full model's, or those given, checked."""
    lo, hi = calibration.flops[0], calibration.flops[-1]
    if isinstance(budgets, int):
        return [lo + (hi - lo) * (i + 1) / (budgets + 1) for i in range(budgets)]  # inside the range: its ends are exits alone
    valid = f"average FLOPs per image between the first exit's cost ({lo:,.0f}) and the full model's ({hi:,.0f}) on the calibration data"
    for i, value in enumerate(budgets):
        if math.isnan(value) or not lo <= value <= hi:
            hint = f" (a share of the backbone? give FLOPs: {value:g} * {hi:,.0f})" if 0 < value <= 1 else ""
            raise ValueError(f"budgets[{i}] must be {valid}; got {value!r}{hint}")
    return budgets


def evaluate_exits(model: MultiExitModel, loader, *, calibrate_on=None, budgets: int | Sequence[float] | None = None,
                   thresholds: Sequence | None = None, criterion="max_prob", speedup: bool = False, timed_batches: int = 4,
                   repeats: int = 5, device=None, progress: bool | None = None) -> ExitEvaluation:
    """Evaluate `model` over `loader`: each exit's accuracy and FLOPs, early exit at calibrated thresholds, and (asked) its speedup.

    Args:
        model: a `MultiExitModel` (`timm_exits.wrap`), on `device` if given. It is evaluated in
            eval mode and gets every submodule's own mode back, also when the call fails.
        loader: the data to report on, batches of ``(inputs, labels, ...)`` like
            `collect_exit_logits` takes (a DataLoader). One pass caches every exit's logits.
        calibrate_on: a second loader (validation data, apart from `loader`) that the budgets'
            thresholds are calibrated on. Without it they are calibrated on `loader` itself: the
            early-exit accuracies are then optimistic, and the result and its table say so.
        budgets: average FLOPs per image to calibrate thresholds for (MSDNet's budgeted batch,
            `calibrate_thresholds`), each between the first exit's cost and the full model's; or
            a count of budgets spread evenly inside that range (its ends are the first and last
            exit alone, already in the per-exit table). Default: 3, or none when `thresholds` is given.
        thresholds: operating points to evaluate as they are, each what `early_exit` takes as
            ``threshold`` (a number, one per early exit, or a `Calibration`); their rows come after
            the budgets' and need no calibration.
        criterion: the confidence `early_exit` reads (``"max_prob"``, ``"entropy"``, ``"margin"``,
            ``"patience"`` or a callable).
        speedup: also time the plain backbone and early exit at every operating point with
            `profile_exits` (``beside=``), in the same alternating rounds, on the first
            `timed_batches` batches of `loader` (kept in memory), `repeats` rounds.
        device: where the inputs go (`collect_exit_logits`'s); the model must already be there.
        progress: progress over the batches and the timing rounds, as `collect_exit_logits` and
            `profile_exits` take it: a tqdm bar on a terminal, lines in a log (None: through logging).

    Returns an `ExitEvaluation`; ``print(evaluation)`` shows it as tables. Example::

        >>> import timm, torch, timm_exits
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1, 2, 3], input_size=(3, 32, 32))
        >>> data = lambda n: TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
        >>> test, val = DataLoader(data(32), batch_size=8), DataLoader(data(32), batch_size=8)
        >>> evaluation = timm_exits.evaluate_exits(model, test, calibrate_on=val)
        >>> print(evaluation)                           # each exit alone, then early exit at 3 budgets
        >>> evaluation.points[0].accuracy, evaluation.points[0].calibration   # the thresholds early_exit takes
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"model must be a MultiExitModel (timm_exits.wrap(model, stages=[...])), got {type(model).__name__}")
    check_criterion(criterion)
    if not isinstance(speedup, bool):
        raise ValueError(f"speedup must be True or False, got {speedup!r}")
    timed_batches, repeats = positive_int(timed_batches, "timed_batches"), positive_int(repeats, "repeats")
    one = isinstance(thresholds, (str, bytes, numbers.Number, Calibration, torch.Tensor)) or not hasattr(thresholds, "__iter__")
    if thresholds is not None and one:
        raise ValueError(f"thresholds must be a list of operating points, each a number, one per early exit or a Calibration; "
                         f"got {thresholds!r} (one operating point: thresholds=[{thresholds!r}])")
    budgets = _budget_values(budgets, thresholds)
    if calibrate_on is loader:
        calibrate_on = None  # one pass, and the result says the thresholds saw the evaluated data
    with evaluating(model):
        cached, batches = _collect(model, loader, "loader", device, progress, keep=timed_batches if speedup else 0)
        calibration = cached if calibrate_on is None else _collect(model, calibrate_on, "calibrate_on", device, progress)[0]
        name, exits, plain = _exit_rows(model, cached, batches.sizes)
        points = _points(cached, calibration, _budgets(budgets, calibration), thresholds, criterion, plain)
        profile = None
        if speedup:
            if not points:
                raise ValueError("speedup=True times early exit at the operating points, and there are none "
                                 "(thresholds=[] and no budgets): give budgets or thresholds")
            profile, points = _timed(model, points, batches.kept, criterion, repeats, device, progress)
    return ExitEvaluation(
        model=name,
        criterion=criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "callable"),
        images=cached.labels.shape[0],
        exits=exits,
        points=points,
        backbone_flops=plain,
        calibration_images=calibration.labels.shape[0],
        calibrated_on_evaluated_data=calibrate_on is None and any(p.budget is not None for p in points),
        timed_images=sum(x.shape[0] for x in batches.kept) if profile is not None else None,
        profile=profile,
    )


def _exit_rows(model, cached: CachedExits, sizes: Counter) -> tuple[str, list[ExitAccuracy], float]:
    """The model's name, each exit's row, and the plain backbone's FLOPs.

    An exit's FLOPs are `flops_report`'s (the backbone up to it and its own head), averaged over the input sizes the loader gave.
    """
    total = sum(sizes.values())
    reports = [(flops_report(model, input_size=size), n / total) for size, n in sizes.items()]
    flops = [sum(r.exits[k].flops * w for r, w in reports) for k in range(cached.num_exits)]
    plain = sum(r.backbone_flops * w for r, w in reports)
    rows = [ExitAccuracy(k, reports[0][0].exits[k].stage, point.accuracy, flops[k], flops[k] / plain)
            for k, point in enumerate(anytime_accuracy(cached))]  # each exit alone, labeled samples only
    return reports[0][0].model, rows, plain


def _points(cached: CachedExits, calibration: CachedExits, budgets: list[float], thresholds, criterion, plain: float) -> list:
    """An operating point per budget (thresholds fit on `calibration`) and per threshold given, each evaluated on `cached`."""
    fits = [(budget, calibrate_thresholds(calibration, budget, criterion=criterion)) for budget in budgets]
    fits += [(None, threshold) for threshold in thresholds or []]
    points = []
    for i, (budget, threshold) in enumerate(fits):
        try:
            result = evaluate_thresholds(cached, threshold, criterion)
        except ValueError as err:  # only a threshold given can be wrong: name it
            raise ValueError(f"thresholds[{i - len(budgets)}]: {err}") from None
        fit = threshold if isinstance(threshold, Calibration) else None
        points.append(OperatingPoint(budget, result.thresholds, result.accuracy, result.flops, result.flops / plain, result.exit_shares,
                                     plain / result.flops, calibration=fit))
    return points


def _timed(model, points: list[OperatingPoint], kept: list[torch.Tensor], criterion, repeats: int, device,
           progress=None) -> tuple[ExitProfile, list]:
    """Time the plain backbone and early exit at each point on the kept batches, in `profile_exits`' rounds.

    Returns the profile and the points with their measured and time-predicted speedups.
    """
    inputs = [x.to(device) if device is not None else x for x in kept]
    decide = [p.calibration if p.calibration is not None else p.thresholds for p in points]
    with torch.no_grad():  # each point's exits on the timed images, for the time-predicted speedup (and a warm-up)
        counts = [sum(torch.tensor(model.early_exit(x, threshold=t, criterion=criterion).exit_counts(model.num_exits)) for x in inputs)
                  for t in decide]
    runs = {"plain": lambda: [model.backbone(x) for x in inputs]}
    runs.update({i: (lambda t=t: [model.early_exit(x, threshold=t, criterion=criterion) for x in inputs]) for i, t in enumerate(decide)})
    profile = profile_exits(model, inputs[0], repeats=repeats, beside=runs, progress=progress)
    seconds = profile.beside_seconds
    timed = []
    for i, (point, count) in enumerate(zip(points, counts)):
        shares = (count.double() / count.sum()).tolist()
        predicted = profile.predicted_speedup(shares)
        timed.append(dataclasses.replace(point, measured_speedup=seconds["plain"] / seconds[i], time_predicted_speedup=predicted))
    return profile, timed
