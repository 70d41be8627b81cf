"""Wrap a timm and a torchvision model, look at their stages, and take one training step.

    python examples/quickstart.py
"""
import timm
import torch
import torchvision

import timm_exits

# Where can exits go? timm's feature_info; torchvision's stages are found in the graph.
for name, backbone in [("timm resnet50", timm.create_model("resnet50", num_classes=10)),
                       ("torchvision resnet50", torchvision.models.resnet50(num_classes=10))]:
    print(name, [s.name for s in timm_exits.list_stages(backbone)])

model = timm_exits.wrap(timm.create_model("resnet50", num_classes=10), stages=[1, 2, 3], head="sdn")
images, target = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))

# One step of your own loop with a multi-exit loss: here exit-ensemble distillation.
loss_fn = timm_exits.ExitEnsembleLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
outputs = model(images)
loss = loss_fn(outputs, target)
loss.backward()
optimizer.step()
print(f"{model.num_exits} exits, logits {[tuple(z.shape) for z in outputs]}, loss {loss.item():.3f}")
print("per-exit terms:", {k: round(v, 3) for k, v in loss_fn.log_dict().items()})

# In eval the last exit is the backbone itself.
model.eval()
with torch.no_grad():
    assert torch.equal(model(images)[-1], model.backbone(images))
print("final exit == backbone output")
