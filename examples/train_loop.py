"""A plain PyTorch training loop with a multi-exit model: the loss and `wrap` are the only new lines.

    python examples/train_loop.py            # 8 epochs on the bundled digits
    python examples/train_loop.py --smoke    # a few steps, for the test suite
"""
import argparse

import timm
import torch

import timm_exits
from timm_exits.demo import evaluate, load_digits_32

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--loss", default="eed", choices=timm_exits.loss_names()[:-1])  # "ekd" needs teachers: see train_timm.py
parser.add_argument("--smoke", action="store_true", help="a few steps on a few samples")
args = parser.parse_args()
torch.manual_seed(0)

x_train, y_train, x_test, y_test = load_digits_32()
if args.smoke:
    x_train, y_train, args.epochs = x_train[:64], y_train[:64], 1

backbone = timm.create_model("resnet18", num_classes=10, in_chans=1)
model = timm_exits.wrap(backbone, stages=[1, 2, 3], input_size=(1, 32, 32))  # new: exits after layer1..3
loss_fn = timm_exits.create_loss(args.loss, num_exits=model.num_exits, epochs=args.epochs)  # new: the multi-exit loss
# the loss may own parameters (MATE's teacher weights): give them to the optimizer too
optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=2e-3)

for epoch in range(args.epochs):
    model.train()
    loss_fn.set_epoch(epoch)  # new: per-epoch schedules (SDN ramp, MSD cosine)
    for batch in torch.randperm(len(y_train)).split(32):
        outputs = model(x_train[batch])  # a list of logits, shallow to deep
        loss = loss_fn(outputs, y_train[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    accuracy = evaluate(model, x_test, y_test)
    print(f"epoch {epoch}: loss {loss.item():.3f}, exit accuracy {[round(a, 3) for a in accuracy]}")

# a run's checkpoint: the wrapped model, the loss's state (schedules, temperature) and the optimizer
checkpoint = {"model": model.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict()}
# the plain backbone, with the trained weights, for anything that expects the original model
plain = model.unwrap().eval()
with torch.no_grad():
    assert torch.equal(plain(x_test[:8]), model.eval()(x_test[:8])[-1])
print(f"saved {len(checkpoint['model'])} model tensors; unwrap() gives the trained {type(plain).__name__}")
