"""A LightningModule around `MultiExitTask` (needs ``pip install lightning``).

    python examples/train_lightning.py            # 6 epochs on the bundled digits
    python examples/train_lightning.py --smoke    # a few steps, for the test suite

The task computes the multi-exit loss and its per-exit terms; Lightning logs them. For several
GPUs, ``Trainer(strategy="ddp")`` works without ``find_unused_parameters``.
"""
import argparse

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm_exits
from timm_exits.demo import load_digits_32


class MultiExitModule(L.LightningModule):
    def __init__(self, loss: str = "eed", epochs: int = 6):
        super().__init__()
        backbone = timm.create_model("resnet18", num_classes=10, in_chans=1)
        model = timm_exits.wrap(backbone, stages=[1, 2, 3], input_size=(1, 32, 32))
        criterion_kwargs = {"epochs": epochs} if loss in ("sdn", "msd") else None
        self.task = timm_exits.MultiExitTask(model, loss, criterion_kwargs=criterion_kwargs, verbose=False)

    def on_train_epoch_start(self):
        self.task.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        result = self.task(*batch)
        self.log_dict({k: v for k, v in result.items() if v.dim() == 0 and k != "loss"})
        self.log("train_loss", result["loss"], prog_bar=True)
        return result["loss"]

    def validation_step(self, batch, batch_idx):
        images, target = batch
        for k, logits in enumerate(self.task.model(images)):  # eval mode: every exit's logits
            self.log(f"val_acc/exit{k + 1}", (logits.argmax(1) == target).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.task.parameters(), lr=2e-3)  # the model's and the loss's


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few samples")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    x_train, y_train, x_test, y_test = load_digits_32()
    if args.smoke:
        x_train, y_train, x_test, y_test, args.epochs = x_train[:64], y_train[:64], x_test[:64], y_test[:64], 1
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu" if args.smoke else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = MultiExitModule(epochs=args.epochs)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=128)
    trainer.fit(module, train_loader, val_loader)
    print("validation:", {k: round(v.item(), 3) for k, v in trainer.callback_metrics.items() if k.startswith("val_acc")})
