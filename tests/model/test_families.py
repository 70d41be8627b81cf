"""Every family of the matrix: wrap it, and check what a user relies on."""
import copy

import pytest
import torch

import timm_exits
from conftest import FAMILIES, small_input


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name):
    torch.manual_seed(0)
    backbone = FAMILIES[name]().eval()
    model = timm_exits.wrap(backbone, stages=[1, 2])
    x = small_input(name)

    # outputs: one (B, num_classes) per exit, and the last is exactly the backbone's
    model.eval()
    with torch.no_grad():
        outputs, reference = model(x), backbone(x)
    assert len(outputs) == model.num_exits == 3
    assert all(z.shape == (2, 5) for z in outputs)
    torch.testing.assert_close(outputs[-1], reference, rtol=0, atol=1e-6)

    # gradients reach every head and every backbone parameter that the forward uses
    model.train()
    sum(z.square().mean() for z in model(x)).backward()
    for head in model.exits:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    used = [p for p in backbone.parameters() if p.requires_grad]
    assert sum(p.grad is not None for p in used) == len(used)

    # every parameter once; state dict = backbone under its own keys + the heads
    params = list(model.named_parameters(remove_duplicate=False))
    assert len(params) == len({id(p) for _, p in params})
    assert len(params) == len(list(backbone.parameters())) + len(list(model.exits.parameters()))
    keys = set(model.state_dict())
    assert {k for k in keys if k.startswith("backbone.")} == {f"backbone.{k}" for k in backbone.state_dict()}
    assert all(k.startswith(("backbone.", "exits.")) for k in keys)

    # round trip into a differently initialised copy (the training step above moved BN statistics)
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        torch.nn.init.normal_(p)
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    with torch.no_grad():
        for a, b in zip(twin(x), model(x)):
            torch.testing.assert_close(a, b)
