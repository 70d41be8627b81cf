"""MultiExitModel behaves like a timm model in a trainer: copies, modes, dtypes, conveniences."""
import copy

import pytest
import timm
import torch

import timm_exits


@pytest.fixture
def model(resnet18):
    return timm_exits.wrap(resnet18, stages=[1, 2, 3])


def x(batch=4):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_deepcopy_is_independent_and_equal(model):
    ema = copy.deepcopy(model)
    model.eval(), ema.eval()
    for a, b in zip(model(x()), ema(x())):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        ema.backbone.fc.weight.add_(1.0)  # an EMA update must not leak into the original
    assert not torch.equal(ema.backbone.fc.weight, model.backbone.fc.weight)
    assert not torch.equal(ema(x())[-1], model(x())[-1])
    torch.testing.assert_close(model(x())[-1], model.backbone(x()))


def test_segments_follow_the_live_backbone(model):
    model.eval()
    model.double()  # replaces buffers (BN running stats): segments must read the new ones
    out = model(x().double())
    assert all(z.dtype == torch.float64 for z in out)
    torch.testing.assert_close(out[-1], model.backbone(x().double()))
    model.backbone.load_state_dict({k: torch.zeros_like(v) for k, v in model.backbone.state_dict().items()})
    assert model(x().double())[-1].abs().sum() == 0


def test_plain_checkpoint_loads_into_backbone(model):
    fresh = timm.create_model("resnet18", num_classes=5)
    model.backbone.load_state_dict(fresh.state_dict())
    model.eval()
    torch.testing.assert_close(model(x())[-1], fresh.eval()(x()))


def test_train_and_eval_modes(model):
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        out = model(x())
    assert not any(z.requires_grad for z in out)


def test_train_graph_keeps_stochastic_depth():
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, drop_path_rate=0.5)
    model = timm_exits.wrap(backbone, stages=[3, 6])
    model.train()
    torch.manual_seed(0)
    a = model(x())[-1]
    torch.manual_seed(1)
    b = model(x())[-1]
    assert not torch.allclose(a, b)  # drop path is live in training...
    model.eval()
    torch.testing.assert_close(model(x())[-1], backbone(x()))  # ...and off in eval


def test_bf16_autocast_on_cpu(model):
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x())
    assert all(z.dtype == torch.bfloat16 and torch.isfinite(z).all() for z in out)


def test_channels_last(model):
    model.eval()
    reference = model(x())
    model.to(memory_format=torch.channels_last)
    out = model(x().to(memory_format=torch.channels_last))
    for a, b in zip(out, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_eval_output_single_tensor(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1, 2]).eval()
    every = model(x())
    model.eval_output = "final"
    torch.testing.assert_close(model(x()), every[-1])
    model.eval_output = "ensemble"
    torch.testing.assert_close(model(x()), torch.stack(every).mean(0))
    assert isinstance(model.train()(x()), list)  # training always gets every exit
    with pytest.raises(ValueError, match="eval_output must be one of"):
        timm_exits.wrap(resnet18, stages=[1], eval_output="last")


def test_return_features(model):
    out = model(x(), return_features=True)
    assert isinstance(out, timm_exits.ExitOutputs)
    assert [f.shape[1] for f in out.features] == [64, 128, 256, 512]
    # the last feature is the backbone's own pre-logits feature
    model.eval()
    out = model(x(), return_features=True)
    torch.testing.assert_close(out.features[-1], model.backbone.forward_head(model.backbone.forward_features(x()), pre_logits=True))


def test_trainer_conveniences():
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32)
    model = timm_exits.wrap(backbone, stages=[3, 6])
    assert model.num_classes == 5
    assert model.pretrained_cfg is backbone.pretrained_cfg
    assert model.no_weight_decay() == {f"backbone.{n}" for n in backbone.no_weight_decay()}
    names = {n for n, _ in model.named_parameters()}
    assert {n for n in model.no_weight_decay() if n in names} == {"backbone.cls_token", "backbone.pos_embed"}
    # timm's layer-decay grouping understands the re-rooted matcher
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False))
    grouped = {n for g in groups.values() for n in g}
    assert grouped == names
    assert any(n.startswith("exits.") for n in list(groups.values())[-1])


def test_grad_checkpointing_gives_the_same_gradients(model):
    def grads():
        model.zero_grad()
        sum(z.square().mean() for z in model(x())).backward()
        return [p.grad.clone() for p in model.parameters()]

    model.eval()  # no BN statistics updates between the two runs
    torch.set_grad_enabled(True)
    plain = grads()
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():  # training path of checkpointing, eval-mode BN for determinism
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    checked = grads()
    assert model.grad_checkpointing and model.backbone.grad_checkpointing
    for a, b in zip(plain, checked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_run_lets_go_of_a_steps_input_before_the_next_segment_runs():
    """Early exit keeps some rows between items; what the step before read must not stay alive in the run meanwhile."""
    import weakref

    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2], input_size=(3, 32, 32)).eval()
    seen, gone = [], None
    hook = model.backbone.layer3[0].conv1.register_forward_pre_hook(lambda module, args: seen.append(gone() is None))
    with torch.no_grad():
        owner = model.run(torch.randn(4, 3, 32, 32))
        run = iter(owner)
        next(run)
        kept = tuple(c[:2].clone() for c in owner.carried)  # early exit keeps two rows
        owner.carried, gone = kept, weakref.ref(kept[0])
        kept = None
        next(run)  # step 2 reads the kept rows
        owner.carried = tuple(c[:1].clone() for c in owner.carried)  # and keeps one of them
        next(run)  # segment 3 runs: the two rows step 2 read are gone
    hook.remove()
    assert seen == [True]


def test_wrap_records_a_head_class_by_the_path_users_import_it_from():
    backbone = timm.create_model("resnet10t", num_classes=10)
    model = timm_exits.wrap(backbone, stages=[1], head=timm_exits.heads.SDNHead, input_size=(3, 32, 32))
    assert model.wrap_args["head"] == ["timm_exits.heads:SDNHead"]
