"""Run by test_training.py under torchrun: FSDP2 (fully_shard) on CPU with gloo, blocks as FSDP units.

The segments call the backbone's submodules directly, so a module is an FSDP unit only if the
traced graph calls it as a whole: wrap() with the block class as a leaf module makes it one.
"""
import timm
import torch
import torch.distributed as dist
from timm.models.resnet import BasicBlock
from torch.distributed.fsdp import fully_shard

import timm_exits

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2, 3], leaf_modules=[BasicBlock])
task = timm_exits.MultiExitTask(model, "mate", verbose=False)
initial = torch.cat([p.detach().flatten() for p in task.parameters()])
blocks = [m for m in model.backbone.modules() if isinstance(m, BasicBlock)]
for block in blocks:
    fully_shard(block)
fully_shard(task.trainable_module)
optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
torch.manual_seed(1 + rank)  # different data on each rank
for _ in range(3):
    result = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    optimizer.zero_grad()
    result["loss"].backward()
    optimizer.step()
full = torch.cat([p.full_tensor().flatten() for p in task.parameters()])
reference = full.clone()
dist.broadcast(reference, src=0)
if rank == 0:
    moved, difference = (full - initial).abs().max().item(), (full - reference).abs().max().item()
    print(f"fsdp2: {len(blocks)} block units, moved {moved:.3g}, largest difference from rank 0: {difference:.3g}")
# as in examples/train_ddp.py: release what holds the gloo group, and meet, before destroying it
# (a rank that tears down while the other still holds it can abort at exit)
del task, optimizer, result, model, blocks
dist.barrier()
dist.destroy_process_group()
