"""Training with timm's own data pipeline and factories, and our task: an ImageFolder in, summary.csv out.

Lines marked ``# timm-exits`` are the ones that differ from training the plain model the way
timm's ``train.py`` does (``create_dataset`` / ``create_loader``, mixup, ``create_optimizer_v2``,
``create_scheduler_v2``, EMA, ``update_summary``, and its ``CheckpointSaver``).
The per-exit loss terms reach ``summary.csv`` beside the loss, and every exit's top-1 beside them.

    python examples/train_timm.py --data DIR   # DIR/train/<class>/*.png and DIR/validation/<class>/*.png
    python examples/train_timm.py              # first writes such a folder from the corrupted digits
    python examples/train_timm.py --smoke      # a tiny folder and a few steps, for the test suite
"""
import argparse
import csv
import inspect
import os
import tempfile
from collections import defaultdict

import timm
import torch
from timm.data import Mixup, create_dataset, create_loader
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, CheckpointSaver, accuracy, update_summary

import timm_exits
from timm_exits.data import corrupted_digits


def write_image_folder(root: str, per_class: int | None = None) -> str:
    """The corrupted digits as PNG files in root/{train,validation}/<digit>/ (one variant per scan)."""
    from PIL import Image

    task = corrupted_digits(seed=0, variants=1)
    for split, data in (("train", task.train), ("validation", task.test)):
        counts = defaultdict(int)
        for image, label in zip(data.x, data.y.tolist()):
            if per_class is not None and counts[label] >= per_class:
                continue
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            pixels = ((image[0] - image.min()) / (image.max() - image.min()).clamp_min(1e-6) * 255).round().byte().numpy()
            Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{counts[label]:05d}.png"))
            counts[label] += 1
    return root


parser = argparse.ArgumentParser()
parser.add_argument("--data", help="an ImageFolder root with train/ and validation/ (default: written from the corrupted digits)")
parser.add_argument("--model", default="resnet18", help="a timm ResNet name (the saver records it as the checkpoint's arch)")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--output", default=None, help="where summary.csv and the checkpoint go (default: a temporary folder)")
parser.add_argument("--smoke", action="store_true", help="a tiny folder and two short epochs")
args = parser.parse_args()
torch.manual_seed(0)
if args.smoke:
    args.epochs = 2
root = args.data or write_image_folder(tempfile.mkdtemp(), per_class=4 if args.smoke else None)
output = args.output or tempfile.mkdtemp()
os.makedirs(output, exist_ok=True)

# timm's train.py: datasets and loaders from a folder, as `--data-dir DIR` gives them
dataset_train = create_dataset("", root=root, split="train", is_training=True)
dataset_eval = create_dataset("", root=root, split="validation")
common = dict(input_size=(3, 32, 32), use_prefetcher=False, num_workers=0, persistent_workers=False, mean=(0.5,) * 3, std=(0.5,) * 3)
loader_train = create_loader(dataset_train, batch_size=32, is_training=True, scale=(0.7, 1.0), hflip=0.0, color_jitter=0.0, **common)
loader_eval = create_loader(dataset_eval, batch_size=64, crop_pct=1.0, **common)

model = timm.create_model(args.model, num_classes=10)
model = timm_exits.wrap(model, stages=[1, 2, 3], input_size=(3, 32, 32), eval_output="final")  # timm-exits
# timm: task = ClassificationTask(model, criterion=SoftTargetCrossEntropy())
task = timm_exits.MultiExitTask(model, "eed", verbose=False)  # timm-exits: exit-ensemble distillation
task.setup_ema(decay=0.9)

mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=2e-3, weight_decay=0.05)
scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=0,
                                        updates_per_epoch=len(loader_train))


def validate(eval_model) -> dict:
    """timm's validate loop (train.py's top-1 and top-5 meters), with every exit's top-1 beside the final one's.

    timm >= 1.0.31 also offers the task's ``create_evaluator()``; the meters work on every timm release.
    """
    eval_model.eval()
    top1, top5 = AverageMeter(), AverageMeter()
    correct, seen = torch.zeros(eval_model.num_exits), 0
    with torch.no_grad():
        for images, target in loader_eval:
            exits = eval_model.forward_exits(images)  # timm-exits: every exit; eval_model(images) is the final one alone
            acc1, acc5 = accuracy(exits[-1], target, topk=(1, 5))
            top1.update(acc1.item(), images.size(0))
            top5.update(acc5.item(), images.size(0))
            correct += torch.stack([(z.argmax(1) == target).sum() for z in exits]).float()
            seen += len(target)
    per_exit = {f"top1/exit{k + 1}": round(100 * float(c) / seen, 2) for k, c in enumerate(correct)}  # timm-exits
    return {"top1": top1.avg, "top5": top5.avg, **per_exit}  # timm-exits


summary = os.path.join(output, "summary.csv")
for epoch in range(epochs):
    task.train()
    task.set_epoch(epoch)  # timm-exits: the loss's per-epoch schedules
    sums, steps = defaultdict(float), 0
    for step, (images, target) in enumerate(loader_train):
        images, target = mixup(images, target)
        result = task(images, target)
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        optimizer.step()
        task.update_ema(step=epoch * len(loader_train) + step)
        scheduler.step_update(epoch * len(loader_train) + step + 1)
        for key, value in result.items():  # timm-exits: "loss" and every exit's terms ("ce/exit1", ...), averaged over the epoch
            if key != "output" and torch.is_tensor(value) and value.numel() == 1:
                sums[key] += float(value.detach())
        steps += 1
    if not steps:
        raise SystemExit(f"{root}/train holds fewer images than one batch of 32 (timm's training loader drops an incomplete last batch)")
    scheduler.step(epoch + 1)
    train_metrics = {key: total / steps for key, total in sums.items()}  # timm's train_one_epoch returns {"loss": ...}
    eval_metrics = validate(task.get_eval_model())
    update_summary(epoch, train_metrics, eval_metrics, filename=summary, write_header=epoch == 0)
    exits_top1 = " / ".join(f"{eval_metrics[f'top1/exit{k}']:.1f}" for k in range(1, 5))
    print(f"epoch {epoch}: loss {train_metrics['loss']:.3f}, top-1 per exit {exits_top1}")

with open(summary) as f:
    columns = next(csv.reader(f))
print(f"summary.csv columns: {', '.join(columns)}")

# timm's CheckpointSaver, as train.py runs it: the weights, the optimizer and the run's args; from timm 1.0.23 it takes
# the task and saves its state (the loss's) too, and before that the model alone
path = os.path.join(output, "model_best.pth.tar")
saver_task = {"task": task} if "task" in inspect.signature(CheckpointSaver).parameters else {}
saver = CheckpointSaver(task.model, optimizer, args=args, checkpoint_dir=output, recovery_dir=output, **saver_task)
saver.save_checkpoint(epochs - 1, metric=eval_metrics["top1"])
fresh = timm_exits.wrap(timm.create_model(args.model, num_classes=10), stages=[1, 2, 3], input_size=(3, 32, 32))
resumed = timm_exits.MultiExitTask(fresh, "eed", verbose=False)
with torch.serialization.safe_globals([argparse.Namespace]):  # the saver pickles args; weights-only loading allows only what is listed
    checkpoint = torch.load(path, weights_only=True)
resumed.load_checkpoint_state(checkpoint["state_dict"], checkpoint.get("task_state"))
final_top1 = validate(resumed.get_eval_model())["top1"]
print(f"resumed from {os.path.basename(path)} (epoch {checkpoint['epoch']}); its final-exit top1 {final_top1:.1f}")

# the plain backbone for timm's own validate.py: `timm-exits export-backbone CHECKPOINT OUT` does the same
plain, _ = timm_exits.export_backbone(path, os.path.join(output, "backbone.safetensors"))
reloaded = timm.create_model(checkpoint["arch"], num_classes=10, checkpoint_path=str(plain))
print(f"export-backbone: {os.path.basename(str(plain))} loads with timm.create_model({checkpoint['arch']!r}, checkpoint_path=...)")
