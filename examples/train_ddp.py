"""Distributed data parallel training of a multi-exit model, launched with torchrun.

    torchrun --nproc_per_node 2 examples/train_ddp.py            # CPU (gloo) or one GPU per process (nccl)
    torchrun --nproc_per_node 2 examples/train_ddp.py --smoke    # a few steps, for the test suite

Each process trains on its own shard; DDP averages the gradients of the backbone, the exit heads
and the loss's own parameters (MATE's teacher weights here), so the replicas stay identical.
No ``find_unused_parameters``: every exit head gets a gradient at every step.
"""
import argparse
import os

import timm
import torch
import torch.distributed as dist

import timm_exits
from timm_exits.demo import evaluate, load_digits_32

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--loss", default="mate")
parser.add_argument("--smoke", action="store_true", help="a few steps on a few samples")
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)

x_train, y_train, x_test, y_test = load_digits_32()
if args.smoke:
    x_train, y_train, args.epochs = x_train[:128], y_train[:128], 1
shard = torch.arange(rank, len(y_train), world)  # this rank's samples

model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32)).to(device)
task = timm_exits.MultiExitTask(model, args.loss, device=device, verbose=False)
task.prepare_distributed(device_ids=[device.index] if cuda else None)
optimizer = torch.optim.AdamW(task.parameters(), lr=2e-3)  # the model's and the loss's parameters

torch.manual_seed(rank)  # each rank shuffles its shard its own way
for epoch in range(args.epochs):
    task.train()
    task.set_epoch(epoch)
    for batch in shard[torch.randperm(len(shard))].split(16):
        result = task(x_train[batch].to(device), y_train[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        optimizer.step()
    if rank == 0:
        accuracy = evaluate(task.model, x_test.to(device), y_test.to(device))
        print(f"epoch {epoch}: loss {result['loss'].item():.3f}, exit accuracy {[round(a, 3) for a in accuracy]}")

# the replicas must be identical: compare every rank's parameters with rank 0's. (Buffers such as
# batch-norm statistics are rank 0's at the start of every forward, DDP's broadcast_buffers, and
# each rank's own batch updates them after.)
state = torch.cat([p.detach().float().flatten() for p in task.parameters()])
reference = state.clone()
dist.broadcast(reference, src=0)
largest = (state - reference).abs().max()
dist.all_reduce(largest, op=dist.ReduceOp.MAX)
if rank == 0:
    print(f"{world} replicas, largest difference from rank 0: {largest.item():.3g}")
    print("replicas identical" if largest.item() == 0 else "replicas DIFFER")
# release DDP's hold on the process group before destroying it, after every rank is done with it:
# a gloo group torn down while a DDP reducer still refers to it can abort at interpreter exit
del task, optimizer, result
dist.barrier()
dist.destroy_process_group()
