"""The main job: train a wrapped timm model on scikit-learn's handwritten digits, report each exit.

The digits (1,797 real 8x8 scans that ship with scikit-learn, so nothing is downloaded) are
upscaled to 32x32 and split 75/25 with a fixed seed. A timm resnet10t with exits after
layer1..layer3 is trained on the CPU with exit-ensemble distillation (or any loss by name).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

__all__ = ["load_digits_32", "evaluate", "fit", "run_demo", "early_exit_tradeoff"]


def load_digits_32(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 1x32x32 standardized digit images and their labels."""
    try:
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
    """Test accuracy of every exit."""
    model.eval()
    correct = None
    for i in range(0, len(x), batch_size):
        outs = model(x[i : i + batch_size])
        hits = torch.stack([(z.argmax(1) == y[i : i + batch_size]).sum() for z in outs])
        correct = hits if correct is None else correct + hits
    return (correct.float() / len(x)).tolist()


def fit(model, loss_fn, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64, lr: float = 4e-3, teacher=None, on_epoch=None) -> None:
    """Train `model` with `loss_fn(model(x), y)` (AdamW, one-cycle schedule), the loss's own parameters too.

    With a `teacher` (a module), the loss is called as ``loss_fn(outputs, y, teacher(x))``, the
    teacher in eval mode under ``no_grad``. ``on_epoch(epoch, mean_loss)`` is called after each epoch.
    """
    params = list(model.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, torch.nn.Module) else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    if teacher is not None:
        teacher.eval()
    for epoch in range(epochs):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        model.train()
        order = torch.randperm(len(x))
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            outputs = model(x[idx])
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


def run_demo(
    model_name: str = "resnet10t", stages=(1, 2, 3), head: str = "linear", loss: str = "eed", epochs: int = 6, batch_size: int = 64, lr: float = 4e-3, seed: int = 0, log=print, plot: str | None = None
) -> dict:
    """Train and evaluate; returns the per-exit accuracies, the early-exit trade-off and timings (also printed through `log`).

    `loss` is a `timm_exits.create_loss` name (default ``"eed"``, exit-ensemble distillation).
    ``"ekd"`` distils from external teachers: the demo first trains the plain backbone with
    cross entropy for the same epochs and uses it as the one teacher of every exit. `plot`: a
    PNG path for the accuracy-vs-FLOPs plot (needs matplotlib).
    """
    import timm

    from .flops import flops_report
    from .presets import create_loss
    from .model import wrap

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_32(seed)
    log(f"digits: {len(x_train)} train / {len(x_test)} test images, 1x32x32, 10 classes")
    backbone = timm.create_model(model_name, pretrained=False, num_classes=10, in_chans=1)
    model = wrap(backbone, stages=list(stages), head=head, input_size=(1, 32, 32))
    loss_fn = create_loss(loss, num_exits=model.num_exits, epochs=epochs)
    log(f"model: {model_name} with exits after {model.stages} ({head} heads) + its own head = {model.num_exits} exits")
    log(f"loss: {loss_fn}")
    start = time.perf_counter()
    teacher = None
    if loss == "ekd":
        teacher = timm.create_model(model_name, pretrained=False, num_classes=10, in_chans=1)
        log(f"training the teacher (plain {model_name}, cross entropy, {epochs} epochs)")
        fit(teacher, F.cross_entropy, x_train, y_train, epochs, batch_size, lr)

    def report(epoch, mean_loss):
        accs = evaluate(model, x_test, y_test)
        log(f"epoch {epoch + 1}/{epochs}  loss {mean_loss:.3f}  test acc per exit " + " ".join(f"{a:.3f}" for a in accs) + f"  ({time.perf_counter() - start:.0f}s)")

    fit(model, loss_fn, x_train, y_train, epochs, batch_size, lr, teacher=teacher, on_epoch=report)
    accs = evaluate(model, x_test, y_test)
    costs = flops_report(model).exits
    names = list(model.stages) + ["head (backbone)"]
    width = max(len(n) for n in names)
    log("")
    log(f"{'exit':>4}  {'attached after':<{width}}  test accuracy  MFLOPs per image  share of the backbone")
    for k, (name, acc, cost) in enumerate(zip(names, accs, costs), start=1):
        log(f"{k:>4}  {name:<{width}}  {acc:>13.4f}  {cost.flops / 1e6:>16.2f}  {cost.share:>21.1%}")
    log("(FLOPs counted by timm_exits.flops_report: fvcore's convention, one multiply-add = 1 FLOP)")
    tradeoff = early_exit_tradeoff(model, x_test, y_test, log=log, plot=plot)
    return {"accuracy": accs, "stages": names, "flops": [c.flops for c in costs], "loss": loss, "early_exit": tradeoff, "seconds": time.perf_counter() - start}


def model_flops(model, x) -> float:
    """FLOPs per sample of the plain backbone on inputs like `x`."""
    from .flops import flops_report

    return flops_report(model, input_size=tuple(x.shape[1:])).backbone_flops


def early_exit_tradeoff(model, x, y, points: int = 5, log=print, plot: str | None = None, repeats: int = 7) -> dict:
    """Calibrate early-exit thresholds on half of (x, y), report the other half, time one operating point.

    For `points` budgets evenly spaced from the first exit's cost to the whole model's, it prints
    the accuracy, the average FLOPs and the share of samples leaving at each exit; then the
    wall-clock speedup of ``model.early_exit`` over the plain backbone at the middle budget,
    beside the speedup its FLOPs predict; and writes the accuracy-vs-FLOPs plot to `plot`.
    """
    from .calibration import anytime_accuracy, budgeted_curve, calibrate_thresholds, collect_exit_logits, evaluate_thresholds, plot_tradeoff

    half = len(x) // 2
    val = collect_exit_logits(model, [(x[:half], y[:half])])
    test = collect_exit_logits(model, [(x[half:], y[half:])])
    first, full = val.flops[0], val.flops[-1]
    log("")
    log(f"early exit: thresholds calibrated on {half} held-out images (MSDNet's budgeted batch), measured on the other {len(x) - half}")
    log(f"{'budget MFLOPs':>13}  {'accuracy':>8}  {'avg MFLOPs':>10}  share of images leaving at exit " + " / ".join(str(k + 1) for k in range(test.num_exits)))
    rows = []
    for i in range(points):
        budget = first + (full - first) * i / max(points - 1, 1)
        calibration = calibrate_thresholds(val, budget)
        result = evaluate_thresholds(test, calibration.thresholds)
        rows.append({"budget": budget, "thresholds": calibration.thresholds, "accuracy": result.accuracy, "flops": result.flops, "exit_shares": result.exit_shares})
        log(f"{budget / 1e6:>13.2f}  {result.accuracy:>8.4f}  {result.flops / 1e6:>10.2f}  " + " / ".join(f"{s:.0%}" for s in result.exit_shares))
    point = rows[len(rows) // 2]
    x_test = x[half:]
    model.eval()
    with torch.no_grad():
        model.early_exit(x_test, threshold=point["thresholds"]), model.backbone(x_test)  # warm-up
        times = {"early": [], "plain": []}
        for _ in range(repeats):
            for label, run in (("early", lambda: model.early_exit(x_test, threshold=point["thresholds"])), ("plain", lambda: model.backbone(x_test))):
                t = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - t)
    measured = statistics.median(times["plain"]) / statistics.median(times["early"])
    predicted = model_flops(model, x) / point["flops"]
    log(f"model.early_exit at the {point['budget'] / 1e6:.2f} MFLOPs budget on {len(x_test)} images: {measured:.2f}x faster than the plain {type(model.backbone).__name__} (its FLOPs predict {predicted:.2f}x)")
    out = {"budgets": rows, "speedup": measured, "predicted_speedup": predicted}
    if plot:
        try:
            curve = budgeted_curve(val, evaluate_on=test)
            out["plot"] = plot_tradeoff(curve, plot, anytime=anytime_accuracy(test), title=f"digits, {len(x) - half} test images: accuracy vs FLOPs")
            log(f"accuracy-vs-FLOPs plot: {plot}")
        except ImportError as err:
            log(f"no plot: {err}")
    return out
