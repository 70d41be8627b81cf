"""The main job: train a wrapped timm model on the corrupted digits (or Fashion-MNIST), against honest baselines.

The task (`timm_exits.data.corrupted_digits`) is built from scikit-learn's 1,797 digit scans,
each in six corrupted variants from trivial to hard, split by scan. A timm resnet18 with exits
after layer1..layer3 is trained on the CPU with exit-ensemble distillation (or any loss by
name); beside it, the same backbone trained alone with cross entropy (the baseline) and a
narrower resnet18 of about an early exit's FLOPs, with the same epochs and batches. Early exit
is calibrated on the validation split and reported on the test split, its speedup three ways:
measured, predicted from each segment's measured time, and predicted from FLOPs.
"""
from __future__ import annotations

import time

import timm
import torch
import torch.nn.functional as F
from tabulate import tabulate
from timm.models.resnet import ResNet

from .._progress import Progress
from ..calibration import anytime_accuracy, budgeted_curve, calibrate_thresholds, collect_exit_logits, evaluate_thresholds
from ..cost.flops import flops_report
from ..cost.profile import profile_exits
from ..data import DEBIAN_FASHION_MNIST, corrupted_digits, fashion_mnist
from ..losses.presets import create_loss
from ..model import wrap
from ..plots import plot_tradeoff
from ..runtime.stream import early_exit_stream

__all__ = ["DATASETS", "load_digits_32", "evaluate", "fit", "narrower", "run_demo", "early_exit_tradeoff"]

#: The demo's data by name, and each one's image size (channels, height, width).
DATASETS = {"digits": (1, 32, 32), "fashion-mnist": (1, 28, 28)}
FASHION_TRAIN = 6000  # training images the demo takes from Fashion-MNIST: about the digits' 6,468, so about their time


def load_digits_32(seed: int = 0):
    """(x_train, y_train, x_test, y_test): the plain digits, 1x32x32 standardized, split 75/25 (the task before the corrupted digits)."""
    try:
        # lazy: scikit-learn is in the demo extra, not a dependency
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("the demo needs scikit-learn: pip install 'timm-exits[demo]'") from err
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> list[float]:
    """Test accuracy of every exit (one entry for a plain model)."""
    model.eval()
    correct = None
    for i in range(0, len(x), batch_size):
        outs = model(x[i : i + batch_size])
        outs = [outs] if isinstance(outs, torch.Tensor) else outs
        hits = torch.stack([(z.argmax(1) == y[i : i + batch_size]).sum() for z in outs])
        correct = hits if correct is None else correct + hits
    return (correct.float() / len(x)).tolist()


def fit(model, loss_fn, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64, lr: float = 4e-3, teacher=None, on_epoch=None,
        progress: str | None = None, features: bool = False) -> None:
    """Train `model` with `loss_fn(model(x), y)` (AdamW, one-cycle schedule), the loss's own parameters too.

    With a `teacher` (a module), the loss is called as ``loss_fn(outputs, y, teacher(x))``, the
    teacher in eval mode under ``no_grad``. ``on_epoch(epoch, mean_loss)`` is called after each epoch.
    `features`: call ``model(x, return_features=True)``, for a loss with a feature term.
    `progress`: a name to report each epoch's batches under, on standard error: a tqdm bar on a
    terminal, else a line at the start, at most every 10 seconds and at each epoch's end
    (``training baseline: epoch 3/8, batch 40/84 (47%), 95s``, the seconds since the training began);
    None: nothing.
    """
    params = list(model.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, torch.nn.Module) else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    if teacher is not None:
        teacher.eval()
    report = Progress(progress is not None)
    for epoch in range(epochs):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        model.train()
        order = torch.randperm(len(x))
        total, seen = 0.0, 0
        starts = range(0, len(order), batch_size)
        for i in report(starts, f"training {progress}: epoch {epoch + 1}/{epochs}"):
            idx = order[i : i + batch_size]
            outputs = model(x[idx], return_features=True) if features else model(x[idx])
            if teacher is None:
                loss = loss_fn(outputs, y[idx])
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x[idx])
                loss = loss_fn(outputs, y[idx], teacher_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / seen)


def narrower(model_name: str, target_flops: float, input_size, **kwargs):
    """A narrower member of a timm ResNet family whose FLOPs are nearest `target_flops`: ``(model, channels)``, or None.

    Every stage's channels are scaled by one factor (the stem is kept), in steps of 1/8 of the
    original width; ``None`` when the model is not a timm ResNet (no ``channels`` to scale).
    """
    full = timm.create_model(model_name, **kwargs)
    if not isinstance(full, ResNet):
        return None
    base = kwargs.pop("channels", (64, 128, 256, 512))  # timm's ResNet default
    best = None
    for eighths in range(1, 8):
        channels = tuple(max(1, c * eighths // 8) for c in base)
        model = timm.create_model(model_name, channels=channels, **kwargs)
        flops = flops_report(model, input_size=input_size).backbone_flops
        if best is None or abs(flops - target_flops) < abs(best[2] - target_flops):
            best = (model, channels, flops)
    return best[0], best[1]


def run_demo(
    model_name: str = "resnet18", stages=(1, 2, 3), head: str = "linear", loss: str = "eed",
    epochs: int = 8, batch_size: int = 64, lr: float = 4e-3, seed: int = 0,
    log=print, plot: str | None = None, baselines: bool = True, variants: int = 6, progress: bool | None = None,
    data: str = "digits", data_root=None, train_size: int | None = None,
) -> dict:
    """Train and evaluate; returns the per-exit accuracies, the baselines, the early-exit trade-off and timings (also
    printed through `log`).

    `loss` is a `timm_exits.create_loss` name (default ``"eed"``, exit-ensemble distillation).
    ``"ekd"`` distils from external teachers: the demo first trains the plain backbone with
    cross entropy for the same epochs and uses it as the one teacher of every exit. With
    `baselines`, the backbone alone (cross entropy) and a narrower member of its family are
    trained on the same batches. `progress`: how far the training, the logits' collection and the
    timing have come, on standard error: a tqdm bar on a terminal, else a line at most every 10
    seconds (a log of the demo is not silent for minutes); the default, None, shows it both ways,
    False nothing. `seed` fixes the weights and the batch order; the task is fixed: with
    ``data="digits"`` (the default, bundled with scikit-learn) `corrupted_digits(seed=0, variants=variants)`,
    with ``data="fashion-mnist"`` `fashion_mnist(data_root, seed=0, train_size=train_size)` read from
    the files on disk (Debian's package when `data_root` is None), training on `train_size` images
    (default 6,000 of the 55,000 left after the validation split: about as long as the digits).
    `plot`: a PNG path for the accuracy-vs-FLOPs plot (needs matplotlib).
    """
    start = time.perf_counter()
    show = True if progress is None else bool(progress)  # the demo is watched, on a terminal or in a log
    bar = lambda name: name if show else None  # noqa: E731
    if data not in DATASETS:
        raise ValueError(f"data must be one of {sorted(DATASETS)}, got {data!r}")
    if data == "digits" and (data_root is not None or train_size is not None):
        raise ValueError(f"data_root={data_root!r} and train_size={train_size!r} are Fashion-MNIST's: give data='fashion-mnist', "
                         "or leave them None for the digits")
    size = DATASETS[data]  # the model is built first, so a bad stage or loss is refused before the data is read
    make = lambda: timm.create_model(model_name, pretrained=False, num_classes=10, in_chans=size[0])  # noqa: E731
    torch.manual_seed(seed)
    model = wrap(make(), stages=list(stages), head=head, input_size=size)
    loss_fn = create_loss(loss, num_exits=model.num_exits, epochs=epochs)
    if data == "digits":
        task = corrupted_digits(seed=0, variants=variants, size=size[-1])
        log(f"corrupted digits: {len(task.train)} train / {len(task.val)} validation / {len(task.test)} test images "
            f"(1,797 scans x {variants} variants, corruptions at severity 1-5, split by scan), {'x'.join(map(str, size))}, 10 classes")
    else:
        task = fashion_mnist(data_root, seed=0, train_size=FASHION_TRAIN if train_size is None else train_size)
        log(f"Fashion-MNIST: {len(task.train)} train / {len(task.val)} validation (both from the training file) / {len(task.test)} test "
            f"images, {'x'.join(map(str, size))}, 10 classes (read from {data_root or DEBIAN_FASHION_MNIST})")
    log(f"model: {model_name} with exits after {model.stages} ({head} heads) + its own head = {model.num_exits} exits")
    log(f"loss: {loss_fn}")
    x, y = task.train.tensors()
    teacher = None
    if loss == "ekd":
        torch.manual_seed(seed)
        teacher = make()
        log(f"training the teacher (plain {model_name}, cross entropy, {epochs} epochs)")
        fit(teacher, F.cross_entropy, x, y, epochs, batch_size, lr, progress=bar("teacher"))

    def report(epoch, mean_loss):
        accs = evaluate(model, task.val.x, task.val.y)
        log(f"epoch {epoch + 1}/{epochs}  loss {mean_loss:.3f}  validation accuracy per exit " + " ".join(f"{a:.3f}" for a in accs)
            + f"  ({time.perf_counter() - start:.0f}s)")

    log(f"training: {epochs} epochs of {(len(x) + batch_size - 1) // batch_size} batches of {batch_size}")
    torch.manual_seed(seed)  # the batch order: the same for the baselines
    fit(model, loss_fn, x, y, epochs, batch_size, lr, teacher=teacher, on_epoch=report, progress=bar(loss))
    accs = evaluate(model, task.test.x, task.test.y)
    costs = flops_report(model).exits
    rows = [(f"exit {k}", name, acc, cost.flops)
            for k, (name, acc, cost) in enumerate(zip(list(model.stages) + ["head (backbone)"], accs, costs), start=1)]
    result = {"accuracy": accs, "stages": [r[1] for r in rows], "flops": [c.flops for c in costs], "loss": loss}
    points = {}
    if baselines:
        result["baselines"] = {}
        torch.manual_seed(seed)
        plain = make()
        small = narrower(model_name, costs[len(costs) // 2 - 1].flops, size, num_classes=10, in_chans=size[0])
        trained = [("baseline", plain, f"{model_name} alone, cross entropy")]
        trained += [("smaller plain", small[0], f"{model_name}, channels {small[1]}")] if small else []
        for label, net, what in trained:
            log(f"training the {label} model ({what}, same epochs and batches)")
            torch.manual_seed(seed)
            fit(net, F.cross_entropy, x, y, epochs, batch_size, lr, progress=bar(label))
            acc, flops = evaluate(net, task.test.x, task.test.y)[0], flops_report(net, input_size=size).backbone_flops
            rows.append((label, what, acc, flops))
            points[f"{label} ({what})"] = (flops, acc)
            result["baselines"][label] = {"model": what, "accuracy": acc, "flops": flops}
        if small is None:
            log(f"(no smaller plain model: {model_name} is not a timm ResNet, whose channels the demo knows how to narrow)")
    full = costs[-1].backbone_flops
    log("")
    table = [[label, name, f"{acc:.4f}", f"{flops / 1e6:.2f}", f"{flops / full:.1%}"] for label, name, acc, flops in rows]
    header = ["", "attached after / model", "test accuracy", "MFLOPs per image", "share of the backbone"]
    for line in tabulate(table, header, tablefmt="plain", disable_numparse=True,
                         colalign=["left", "left", "right", "right", "right"]).splitlines():
        log(line)
    log(
        f"(test split: {len(task.test)} images, so one image is {1 / len(task.test):.2%}; "
        "FLOPs counted by timm_exits.flops_report: fvcore's convention, one multiply-add = 1 FLOP)"
    )
    result["early_exit"] = early_exit_tradeoff(model, task, log=log, plot=plot, points=points, progress=show)
    result["seconds"] = time.perf_counter() - start
    log(f"done in {result['seconds']:.0f}s")
    return result


def early_exit_tradeoff(model, task, points: dict | None = None, budgets: int = 5, log=print, plot: str | None = None,
                        repeats: int = 5, batch_size: int = 64, progress: bool | None = None) -> dict:
    """Calibrate early-exit thresholds on the validation split, report the test split at `budgets` budgets.

    The budgets are evenly spaced from the first exit's cost to the whole model's. For each,
    it prints the test accuracy, the average FLOPs, the share of images leaving at each exit,
    and the speedup over the plain backbone on the test split in batches of `batch_size`:
    measured as the library recommends for a stream of batches (``early_exit_stream``: every
    segment runs on full batches) and batch by batch (``model.early_exit`` on each batch, whose
    later segments see ever smaller batches), predicted from each segment's and head's measured
    time (`timm_exits.profile_exits`: the physical limit of skipping the rest), and predicted
    from FLOPs. Both measurements and the prediction's parts are timed in the same `repeats`
    alternating rounds (medians). A last line says what the numbers mean at the budget where the
    share of images leaving early is nearest half. Writes the accuracy-vs-FLOPs plot to `plot`,
    with `points` (``{label: (flops, accuracy)}``) drawn beside the curve. `progress` is
    `collect_exit_logits`'s and `profile_exits`'s: their passes and timing rounds, reported as there.
    """
    batches = lambda split: [  # noqa: E731
        (split.x[i : i + batch_size], split.y[i : i + batch_size]) for i in range(0, len(split), batch_size)
    ]
    val = collect_exit_logits(model, batches(task.val), progress=progress)
    test = collect_exit_logits(model, batches(task.test), progress=progress)
    first, full = val.flops[0], val.flops[-1]
    report = flops_report(model).exits
    backbone = report[-1].backbone_flops
    model.eval()
    images = [x for x, _ in batches(task.test)]
    rows, runs = [], {"plain": lambda: [model.backbone(x) for x in images]}
    for i in range(budgets):
        budget = first + (full - first) * i / max(budgets - 1, 1)
        calibration = calibrate_thresholds(val, budget)
        result = evaluate_thresholds(test, calibration.thresholds)
        rows.append({"budget": budget, "thresholds": calibration.thresholds, "accuracy": result.accuracy, "flops": result.flops,
                     "exit_shares": result.exit_shares, "flops_predicted": backbone / result.flops})
        runs[("stream", i)] = lambda t=calibration.thresholds: early_exit_stream(model, images, threshold=t)
        runs[("per batch", i)] = lambda t=calibration.thresholds: [model.early_exit(x, threshold=t) for x in images]
    # the prediction's parts timed in the measured runs' rounds
    profile = profile_exits(model, task.test.x[:batch_size], repeats=repeats, beside=runs, progress=progress)
    times = profile.beside_seconds
    for i, row in enumerate(rows):
        row["time_predicted"] = profile.predicted_speedup(row["exit_shares"])
        row["measured"] = times["plain"] / times[("stream", i)]
        row["measured_per_batch"] = times["plain"] / times[("per batch", i)]
    log("")
    log(
        f"early exit: thresholds calibrated on the {len(task.val)} validation images (MSDNet's budgeted batch), "
        f"reported on the {len(task.test)} test images"
    )
    log(f"speedup over the plain {type(model.backbone).__name__} at batch {batch_size}, median of {repeats} alternating rounds: "
        "streamed (early_exit_stream: every segment on full batches), batch by batch (model.early_exit on each batch), "
        "time-predicted (from each segment's measured time), FLOPs-predicted")
    header = ["budget MFLOPs", "accuracy", "avg MFLOPs", "streamed", "batch by batch", "time-predicted", "FLOPs-predicted",
              "share of images leaving at exit " + " / ".join(str(k + 1) for k in range(test.num_exits))]
    table = [[f"{row['budget'] / 1e6:.2f}", f"{row['accuracy']:.4f}", f"{row['flops'] / 1e6:.2f}",
              *(f"{row[key]:.2f}x" for key in ("measured", "measured_per_batch", "time_predicted", "flops_predicted")),
              " / ".join(f"{s:.0%}" for s in row["exit_shares"])] for row in rows]
    for line in tabulate(table, header, tablefmt="plain", disable_numparse=True, colalign=["right"] * 7 + ["left"]).splitlines():
        log(line)
    reached = [c.backbone_flops for c in report]
    time_shares = [t / sum(profile.segment_seconds) for t in profile.segment_seconds]
    flops_shares = [(b - a) / backbone for a, b in zip([0] + reached, reached)]
    log("where the time goes, segment by segment: share of the backbone's time " + " / ".join(f"{v:.0%}" for v in time_shares)
        + ", of its FLOPs " + " / ".join(f"{v:.0%}" for v in flops_shares))
    takeaway = _takeaway(rows) if rows else ""
    if takeaway:
        log(takeaway)
    out = {"budgets": rows, "profile": profile, "takeaway": takeaway}
    if plot:
        try:
            curve = budgeted_curve(val, evaluate_on=test)
            plot_tradeoff(curve, plot, anytime=anytime_accuracy(test), points=points,
                          title=f"{task.name}, {len(task.test)} test images")
            out["plot"] = str(plot)
            log(f"accuracy-vs-FLOPs plot: {plot}")
        except ImportError as err:
            log(f"no plot: {err}")
    return out


def _takeaway(rows: list[dict]) -> str:
    """One line on what the trade-off's numbers mean, at the budget where the share of images leaving early is nearest half."""
    row = min(rows, key=lambda r: abs(1 - r["exit_shares"][-1] - 0.5))
    early, reached = 1 - row["exit_shares"][-1], row["measured"] / row["time_predicted"]
    gap = (f"the stream's gap to it ({1 - reached:.0%}) is the per-step overhead" if reached < 1
           else "the stream reaches it: what per-step overhead is left is within the rounds' noise")
    return (f"takeaway: at the {row['budget'] / 1e6:.2f} MFLOPs budget {early:.0%} of images leave early; "
            f"streamed early exit is {row['measured']:.2f}x as fast as the plain model, batch by batch {row['measured_per_batch']:.2f}x; "
            f"the time-predicted {row['time_predicted']:.2f}x is the limit of skipping the rest, and {gap}")
