"""The main job: train a wrapped timm model on scikit-learn's handwritten digits, report each exit.

The digits (1,797 real 8x8 scans that ship with scikit-learn, so nothing is downloaded) are
upscaled to 32x32 and split 75/25 with a fixed seed. A timm resnet10t with exits after
layer1..layer3 is trained on the CPU with exit-ensemble distillation (or any loss by name).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

__all__ = ["load_digits_32", "evaluate", "fit", "run_demo"]


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


def run_demo(model_name: str = "resnet10t", stages=(1, 2, 3), head: str = "linear", loss: str = "eed", epochs: int = 6, batch_size: int = 64, lr: float = 4e-3, seed: int = 0, log=print) -> dict:
    """Train and evaluate; returns the per-exit accuracies and timings (also printed through `log`).

    `loss` is a `timm_exits.create_loss` name (default ``"eed"``, exit-ensemble distillation).
    ``"ekd"`` distils from external teachers: the demo first trains the plain backbone with
    cross entropy for the same epochs and uses it as the one teacher of every exit.
    """
    import timm

    from .flops import flops_report
    from .losses import create_loss
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
    return {"accuracy": accs, "stages": names, "flops": [c.flops for c in costs], "loss": loss, "seconds": time.perf_counter() - start}
