"""Training with timm's factories (model, mixup, optimizer, scheduler, EMA, checkpoints) and our task.

Lines marked ``# timm-exits`` are the ones that differ from training the plain model with timm's
``ClassificationTask``; everything else is what timm's own training script does.

    python examples/train_timm.py            # 6 epochs on the bundled digits
    python examples/train_timm.py --smoke    # a few steps, for the test suite
"""
import argparse
import os
import tempfile

import timm
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import timm_exits
from timm_exits.demo import load_digits_32

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--smoke", action="store_true", help="a few steps on a few samples")
args = parser.parse_args()
torch.manual_seed(0)

x_train, y_train, x_test, y_test = load_digits_32()
if args.smoke:
    x_train, y_train, x_test, y_test, args.epochs = x_train[:64], y_train[:64], x_test[:64], y_test[:64], 2
batches = len(y_train) // 32

model = timm.create_model("resnet18", num_classes=10, in_chans=1)
model = timm_exits.wrap(model, stages=[1, 2, 3], input_size=(1, 32, 32), eval_output="final")  # timm-exits
# timm: task = ClassificationTask(model, criterion=SoftTargetCrossEntropy())
task = timm_exits.MultiExitTask(model, "eed", verbose=False)  # timm-exits: exit-ensemble distillation
task.setup_ema(decay=0.9)

mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
optimizer = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=2e-3, weight_decay=0.05)
scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=0, updates_per_epoch=batches)


def validate(eval_model):
    evaluator = task.create_evaluator()
    eval_model.eval()
    with torch.no_grad():
        for batch in torch.arange(len(y_test)).split(128):
            evaluator.update(eval_model(x_test[batch]), y_test[batch])  # eval_output="final": one tensor
    return evaluator.summary()


for epoch in range(epochs):
    task.train()
    task.set_epoch(epoch)  # timm-exits: the loss's per-epoch schedules
    order = torch.randperm(len(y_train))[: batches * 32].view(batches, 32)
    for step, batch in enumerate(order):
        images, target = mixup(x_train[batch], y_train[batch])
        result = task(images, target)
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        optimizer.step()
        task.update_ema(step=epoch * batches + step)
        scheduler.step_update(epoch * batches + step + 1)
    scheduler.step(epoch + 1)
    per_exit = {k: round(v.item(), 3) for k, v in result.items() if k.startswith("ce/")}  # timm-exits: per-exit terms
    metrics = validate(task.get_eval_model())
    print(f"epoch {epoch}: loss {result['loss'].item():.3f} {per_exit} final-exit top1 {metrics['top1']:.1f}")

# a checkpoint as timm's CheckpointSaver writes it: model weights, task state (the loss's), optimizer
path = os.path.join(tempfile.mkdtemp(), "checkpoint.pth.tar")
torch.save({"epoch": epochs - 1, "version": 2, **task.get_checkpoint_state(), **task.get_checkpoint_state(ema=True), "optimizer": optimizer.state_dict()}, path)
resumed = timm_exits.MultiExitTask(timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32)), "eed", verbose=False)
checkpoint = torch.load(path, weights_only=True)
resumed.load_checkpoint_state(checkpoint["state_dict"], checkpoint["task_state"])
print(f"resumed from {os.path.basename(path)} (epoch {checkpoint['epoch']}); EMA final-exit top1 {validate(task.get_eval_model(ema=True))['top1']:.1f}")
