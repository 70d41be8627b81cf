"""Zero Time Waste's cascading heads, against the cascade written out here from hooked stage features.

Exit k's logits are its own head on its stage's feature plus a linear map of exit k-1's logits
(detached); the wrapped model must carry those logits through every runtime: forward, early exit
(which drops rows), exported steps, FLOPs, profiles, checkpoints and saved folders.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_exits
from conftest import exactly, fallback_resnet
from timm_exits._checks import release
from timm_exits.heads import CascadedHead
from timm_exits.plots import describe_exits
from timm_exits.runtime import exit_costs


def cascaded(cascade=True, head="linear", stages=(1, 2, 3)):
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=5)
    return timm_exits.wrap(backbone, stages=list(stages), head=head, input_size=(3, 32, 32), cascade=cascade)


def reference(model, x):
    """Every exit's logits, computed here: stage features from forward hooks on the backbone, heads applied by hand."""
    features = {}
    handles = [model.backbone.get_submodule(s).register_forward_hook(lambda m, i, o, s=s: features.__setitem__(s, o)) for s in model.stages]
    try:
        final = model.backbone(x)
    finally:
        for h in handles:
            h.remove()
    logits = []
    for k, (stage, head) in enumerate(zip(model.stages, model.exits)):
        if k == 0:
            logits.append(head(features[stage]))
        else:
            inner = head.head(features[stage])
            logits.append(inner + F.linear(head.norm(logits[-1]), head.previous.weight))
    return logits + [final]


@pytest.mark.parametrize("cascade", [True, "layernorm"])
def test_each_head_after_the_first_adds_a_map_of_the_previous_exits_logits(cascade):
    model = cascaded(cascade).eval()
    assert [type(h).__name__ for h in model.exits] == ["LinearHead", "CascadedHead", "CascadedHead"]
    assert isinstance(model.exits[2].norm, nn.LayerNorm) == (cascade == "layernorm")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(model(x), reference(model, x)):
            torch.testing.assert_close(got, want)
        model.train()
        for got, want in zip(model(x), reference(model, x)):
            torch.testing.assert_close(got, want)


def test_a_cascaded_linear_head_is_one_linear_layer_on_the_feature_and_the_previous_logits():
    """The authors' layer: Linear(cat(pooled feature, previous logits)), initialised as one layer of that width."""
    model = cascaded()
    head = model.exits[1]
    bound = 1 / math.sqrt(head.head.fc.in_features + 5)
    for p in (head.head.fc.weight, head.head.fc.bias, head.previous.weight):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    feature, previous = torch.randn(3, 128, 4, 4), torch.randn(3, 5)
    one = torch.cat([head.head.fc.weight, head.previous.weight], dim=1)
    expected = F.linear(torch.cat([feature.mean((2, 3)), previous], dim=1), one, head.head.fc.bias)
    torch.testing.assert_close(head(feature, previous), expected)


def test_the_previous_logits_are_detached():
    model = cascaded().train()
    logits = model(torch.randn(4, 3, 32, 32))
    logits[1].sum().backward()
    assert all(p.grad is None for p in model.exits[0].parameters())  # exit 2's loss does not reach exit 1's head
    assert model.exits[1].previous.weight.grad is not None


def test_any_head_kind_is_cascaded_and_the_fallback_runtime_carries_the_logits_too():
    for head in ("sdn", "conv"):
        model = cascaded(head=head).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            for got, want in zip(model(x), reference(model, x)):
                torch.testing.assert_close(got, want)
    torch.manual_seed(0)
    plain = fallback_resnet()
    backbone = plain.backbone
    with pytest.warns(UserWarning, match="forward_intermediates"):
        model = timm_exits.wrap(backbone, stages=[1, 2], input_size=(3, 32, 32), cascade=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(model(x), reference(model, x)):
            torch.testing.assert_close(got, want)
    report = timm_exits.flops_report(model, input_size=(3, 32, 32))
    assert report.exits[1].head_flops > 0


def test_early_exit_carries_the_logits_of_the_samples_still_running():
    model = cascaded().eval()
    x = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_exits(x)
    threshold = [float(torch.softmax(z.detach(), -1).amax(-1).median()) for z in every[:-1]]  # about half leave at each exit
    result = model.early_exit(x, threshold=threshold)
    counts = result.exit_counts(4)
    assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0 and counts[3] > 0
    for i in range(48):
        torch.testing.assert_close(result.logits[i], every[int(result.exit_index[i])][i])


def test_exported_steps_and_grad_checkpointing_equal_the_model():
    model = cascaded().eval()
    x = torch.randn(3, 3, 32, 32)
    every = model.forward_exits(x)
    exported = timm_exits.export_exits(model, x, whole=False)
    for got, want in zip(exported.run_steps(torch.cat([x, x[:1]])), every):
        torch.testing.assert_close(got[:3], want)
    model.train()
    expected = reference(model, x)  # train mode both: batch statistics (hooked before timm's checkpoint_seq bypasses layer1's hooks)
    model.set_grad_checkpointing(True)
    out = model(x)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
    sum(z.sum() for z in out).backward()
    assert model.exits[2].previous.weight.grad is not None


def test_the_cascades_flops_are_the_map_of_the_previous_logits():
    plain = timm_exits.flops_report(cascaded(False), input_size=(3, 32, 32)).exits
    report = timm_exits.flops_report(cascaded(), input_size=(3, 32, 32)).exits
    assert report[0].head_flops == plain[0].head_flops
    assert [report[k].head_flops - plain[k].head_flops for k in (1, 2)] == [25, 25]  # a 5 x 5 map, one MAC per weight
    assert report[-1].flops == plain[-1].flops  # the backbone's own head is not cascaded
    costs = [exit_costs(m, (3, 32, 32)) for m in (cascaded(False), cascaded())]
    assert [round(b - a) for a, b in zip(*costs)] == [0, 25, 50, 50]  # leaving at exit k computes every head on the way
    assert [p.head for p in describe_exits(cascaded())] == [
        "LinearHead", "CascadedHead(LinearHead)", "CascadedHead(LinearHead)", "backbone's own head"
    ]
    profile = timm_exits.profile_exits(cascaded().eval(), torch.randn(2, 3, 32, 32), repeats=1)
    assert len(profile.head_seconds) == 4


def test_saved_reset_and_checkpointed_cascades_keep_their_cascade(tmp_path):
    model = cascaded().eval()
    x = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path / "m", model_args=None if release("timm") >= (1, 0, 31) else {})  # timm records them from 1.0.31
    again = timm_exits.from_pretrained(tmp_path / "m")
    assert type(again.exits[1]).__name__ == "CascadedHead"
    for got, want in zip(again(x), model(x)):
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match=r"unexpected keys: .*exits\.1\.previous\.weight"):
        cascaded(False).load_state_dict(model.state_dict())
    model.reset_classifier(7)
    assert [tuple(z.shape) for z in model(x)] == [(2, 7)] * 4
    assert model.exits[2].previous.weight.shape == (7, 7)


def test_bad_cascades_are_named():
    with pytest.raises(ValueError, match=exactly("cascade must be False, True or 'layernorm', got 'yes'")):
        cascaded("yes")
    with pytest.raises(ValueError, match=r"^cascade=True needs at least two exit heads"):
        cascaded(stages=(2,))


def test_a_first_head_cascaded_by_hand_is_named():
    model = cascaded(False).eval()
    model.exits[0] = CascadedHead(model.exits[0], 5)
    with pytest.raises(ValueError, match=exactly(
        "the head of exit 1 (CascadedHead) is cascaded, but there is no exit before it to read: cascade the heads after the first"
    )):
        model(torch.randn(2, 3, 32, 32))


def test_a_checkpoint_saved_without_the_cascade_names_it():
    plain = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2], input_size=(3, 32, 32))
    cascaded = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2], input_size=(3, 32, 32), cascade=True)
    with pytest.raises(RuntimeError, match=r"the checkpoint comes from a model wrapped with cascade=False, this one with cascade=True: "
                                            r"wrap it as it was saved$"):
        cascaded.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match=r"wrapped with cascade=True, this one with cascade=False"):
        plain.load_state_dict(cascaded.state_dict())
    other = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2, 3], input_size=(3, 32, 32), cascade=True)
    with pytest.raises(RuntimeError, match=r"only exit heads differ") as refused:  # both cascaded, other stages: not the cascade's doing
        other.load_state_dict(cascaded.state_dict())
    assert "cascade=" not in str(refused.value)

