"""Per-exit FLOPs: each exit's count equals an independent count of the truncated backbone."""
import json
import math

import pytest
import timm
import torch
import torchvision
from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor

import timm_exits
from timm_exits.cli import main
from timm_exits.flops import FLOP_HANDLES


def fvcore_total(module, x, extra=True) -> int:
    """fvcore's count of `module` in eval mode, with our extra handles (or fvcore's defaults only)."""
    analysis = FlopCountAnalysis(module.eval(), (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    if extra:
        analysis.set_op_handle(**FLOP_HANDLES)
    return analysis.total()


def vit_tiny(img_size=32, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=img_size, **kwargs)


def test_resnet_exits_equal_the_truncated_backbone():
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=5).eval()
    model = timm_exits.wrap(backbone, stages=["layer1", "layer2", "layer3"])
    report = timm_exits.flops_report(model, input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    for cost, stage in zip(report.exits, model.stages):
        truncated = create_feature_extractor(backbone, return_nodes={stage: "out"})
        assert cost.stage == stage
        assert cost.backbone_flops == fvcore_total(truncated, x)
        assert cost.flops == cost.backbone_flops + cost.head_flops
    assert report.exits[-1].backbone_flops == fvcore_total(backbone, x)
    assert report.exits[-1].share == 1.0 and report.exits[-1].head_flops == 0
    shares = [e.share for e in report.exits]
    assert shares == sorted(shares) and 0 < shares[0]


def test_vit_exits_equal_the_truncated_backbone_and_attention_is_counted():
    backbone = vit_tiny().eval()
    model = timm_exits.wrap(backbone, stages=[2, 5, 8])
    report = timm_exits.flops_report(model)
    x = torch.randn(1, 3, 32, 32)

    class Truncated(torch.nn.Module):  # timm's own way to stop after block k
        def __init__(self, k):
            super().__init__()
            self.backbone, self.k = backbone, k

        def forward(self, x):
            return self.backbone.forward_intermediates(x, indices=[self.k], intermediates_only=True, stop_early=True)[0]

    for cost, k in zip(report.exits, (2, 5, 8)):
        assert cost.backbone_flops == fvcore_total(Truncated(k), x)
    assert report.exits[-1].backbone_flops == fvcore_total(backbone, x)
    assert "aten::scaled_dot_product_attention" not in report.uncounted_ops
    # the fused kernel counts what the explicit matmuls count
    for block in backbone.blocks:
        block.attn.fused_attn = False
    unfused = timm_exits.flops_report(model)
    assert [e.flops for e in unfused.exits] == [e.flops for e in report.exits]


def test_last_exit_equals_fvcore_on_the_unwrapped_model():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet50", num_classes=5).eval()
    model = timm_exits.wrap(backbone, stages=[1, 2, 3])
    report = timm_exits.flops_report(model, input_size=(3, 224, 224))
    plain = fvcore_total(backbone, torch.randn(1, 3, 224, 224), extra=False)  # fvcore as it ships
    assert math.isclose(report.exits[-1].backbone_flops, plain, rel_tol=1e-3)
    assert report.exits[-1].params == sum(p.numel() for p in backbone.parameters())
    assert report.all_exits_flops == report.backbone_flops + sum(e.head_flops for e in report.exits)


def test_linear_head_flops_are_pool_plus_matmul_by_hand():
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2])
    report = timm_exits.flops_report(model, input_size=(3, 32, 32))
    # resnet18 at 32x32: layer1 gives 64 x 8 x 8, layer2 128 x 4 x 4; mean pool reads each element once
    assert report.exits[0].head_flops == 64 * 8 * 8 + 64 * 5
    assert report.exits[1].head_flops == 128 * 4 * 4 + 128 * 5
    assert report.exits[0].head_params == 64 * 5 + 5
    backbone_params = sum(p.numel() for n, p in model.backbone.named_parameters() if n.startswith(("conv1", "bn1", "layer1")))
    assert report.exits[0].backbone_params == backbone_params
    assert report.exits[0].params == backbone_params + 64 * 5 + 5


def flop_counter_macs(model, x) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2  # it counts a multiply and an add


def test_agrees_with_torch_flop_counter_on_resnet50():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet50").eval()
    report = timm_exits.flops_report(timm_exits.wrap(backbone, stages=[1, 2, 3]), input_size=(3, 224, 224))
    assert math.isclose(report.exits[-1].flops, flop_counter_macs(backbone, torch.randn(1, 3, 224, 224)), rel_tol=0.02)


def test_fused_attention_agrees_with_torch_flop_counter_on_explicit_matmuls():
    backbone = vit_tiny(img_size=224).eval()  # 197 tokens: attention is ~15 % of the FLOPs
    fused = timm_exits.flops_report(timm_exits.wrap(backbone, stages=[5]))
    assert all(block.attn.fused_attn for block in backbone.blocks)
    for block in backbone.blocks:  # FlopCounterMode on CPU does not see the fused kernel
        block.attn.fused_attn = False
    reference = flop_counter_macs(backbone, torch.randn(1, 3, 224, 224))
    assert math.isclose(fused.exits[-1].flops, reference, rel_tol=0.02)
    without_attention = fvcore_total(backbone, torch.randn(1, 3, 224, 224), extra=False) - 12 * 2 * 3 * 197 * 197 * 64
    assert not math.isclose(without_attention, reference, rel_tol=0.02)  # the check can tell


def test_report_formats():
    model = timm_exits.wrap(vit_tiny(), stages=[3, 6], head=["linear", "sdn"])
    report = timm_exits.flops_report(model)
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert [e["stage"] for e in data["exits"]] == ["blocks.3", "blocks.6", "final"]
    assert data["exits"][1]["head"] == "SDNHead" and data["input_size"] == [3, 32, 32]
    assert "aten::gelu" in data["uncounted_ops"]
    text = str(report)
    assert "one fused multiply-add = 1 FLOP" in text and "blocks.6" in text and "uncounted operators: " in text
    md = report.to_markdown().splitlines()
    assert md[2].startswith("| exit | attached after |") and len([r for r in md if r.startswith("| ")]) == 4


def test_example_input_counts_per_sample_and_mode_is_restored(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1, 2]).train()
    one = timm_exits.flops_report(model, input_size=(3, 32, 32))
    batch = timm_exits.flops_report(model, example_input=torch.randn(4, 3, 32, 32))
    assert [e.flops for e in batch.exits] == [e.flops for e in one.exits]
    assert model.training and all(m.training for m in model.modules())


def test_plain_model_is_one_exit_with_a_note(resnet18):
    report = timm_exits.flops_report(resnet18, input_size=(3, 32, 32))
    assert len(report.exits) == 1 and report.exits[0].share == 1.0
    assert report.exits[0].flops == fvcore_total(resnet18, torch.randn(1, 3, 32, 32))
    assert any("not a MultiExitModel" in note for note in report.notes)


def test_forward_intermediates_fallback_is_counted_per_exit():
    from test_bad_input import DataDependent

    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=5).eval()
    traceable = timm_exits.flops_report(timm_exits.wrap(backbone, stages=[1, 2]), input_size=(3, 32, 32))
    backbone.layer2[0].act1 = DataDependent()
    with pytest.warns(UserWarning):
        model = timm_exits.wrap(backbone, stages=[1, 2])
    report = timm_exits.flops_report(model, input_size=(3, 32, 32))
    assert [e.flops for e in report.exits] == [e.flops for e in traceable.exits]
    assert [e.params for e in report.exits] == [e.params for e in traceable.exits]
    assert any("its own trace" in note for note in report.notes)
    with pytest.warns(UserWarning):
        placed = timm_exits.wrap(backbone, stages=timm_exits.at_flops(0.3, 0.55), input_size=(3, 32, 32))
    assert placed.stages == ["layer1", "layer2"]  # 32 % and 55 % of resnet18's FLOPs


def test_a_failing_operator_is_named_and_the_report_still_comes(resnet18):
    def broken(inputs, outputs):
        raise RuntimeError("no shape")

    model = timm_exits.wrap(resnet18, stages=[1])
    report = timm_exits.flops_report(model, input_size=(3, 32, 32), handles={"aten::linear": broken})
    assert list(report.failed_ops) == ["aten::linear"] and "no shape" in report.failed_ops["aten::linear"]
    assert "counting aten::linear failed (RuntimeError: no shape)" in str(report)
    assert report.exits[-1].flops > 0


@pytest.mark.parametrize("size", [(3, 32), (3, 0, 32), (3, -1, 32), (3.0, 32, 32)])
def test_bad_input_size(resnet18, size):
    with pytest.raises(ValueError, match="input_size must be three positive ints"):
        timm_exits.flops_report(timm_exits.wrap(resnet18, stages=[1]), input_size=size)


def test_bad_arguments(resnet18):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        timm_exits.flops_report("resnet18")
    with pytest.raises(TypeError, match="handles must be a dict"):
        timm_exits.flops_report(resnet18, handles=[1])
    with pytest.raises(ValueError, match="not both"):
        timm_exits.flops_report(resnet18, input_size=(3, 32, 32), example_input=torch.randn(1, 3, 32, 32))


def test_at_flops_places_vit_exits_by_share_of_flops():
    backbone = vit_tiny()
    placement = timm_exits.at_flops(0.25, 0.5, 0.75)
    shares = placement.shares(backbone)
    assert list(shares) == [f"blocks.{i}" for i in range(11)]
    picked = placement.resolve(backbone)
    for name, target in zip(picked, placement.fractions):
        assert all(abs(shares[name] - target) <= abs(s - target) for s in shares.values())
    model = timm_exits.wrap(backbone, stages=placement)
    assert model.stages == picked == ["blocks.2", "blocks.5", "blocks.8"]
    report = timm_exits.flops_report(model)
    assert [round(e.backbone_flops / report.backbone_flops, 6) for e in report.exits[:-1]] == [round(shares[n], 6) for n in picked]


def test_at_flops_blocks_gives_finer_cuts_for_a_cnn(resnet18):
    coarse = timm_exits.at_flops(0.25, 0.5, 0.75).shares(resnet18, input_size=(3, 32, 32))
    fine = timm_exits.at_flops(0.25, 0.5, 0.75, candidates="blocks").shares(resnet18, input_size=(3, 32, 32))
    assert set(coarse) < set(fine) and "layer2.0" in fine and "layer4.0" in fine and "layer4" not in fine
    with pytest.raises(ValueError, match="several fractions land on the same stage"):
        timm_exits.wrap(resnet18, stages=timm_exits.at_flops(0.3, 0.35), input_size=(3, 32, 32))
    model = timm_exits.wrap(resnet18, stages=timm_exits.at_flops(0.2, 0.35, candidates="blocks"), input_size=(3, 32, 32))
    assert model.stages == ["layer1.0", "layer1"]  # 19 % and 32 % of resnet18's FLOPs


@pytest.mark.parametrize("args, match", [((), "at least one"), ((0.5, 0.25), "must increase"), ((0.0,), "strictly between"), ((1.5,), "strictly between"), ((True,), "strictly between")])
def test_at_flops_bad_fractions(args, match):
    with pytest.raises(ValueError, match=match):
        timm_exits.at_flops(*args)


def test_cli_prints_json_and_a_table(capsys):
    assert main(["flops", "resnet18", "--stages", "1", "layer2", "--input-size", "3", "32", "32", "--num-classes", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "resnet18" and [e["stage"] for e in data["exits"]] == ["layer1", "layer2", "final"]
    assert main(["flops", "torchvision:resnet18", "--at-flops", "0.3", "0.6", "--input-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "torchvision:resnet18" in out and "share" in out and "final" in out


def test_cli_unknown_model_and_bad_size(capsys):
    with pytest.raises(SystemExit, match="did you mean resnet50"):
        main(["flops", "resnet5O"])
    with pytest.raises(SystemExit, match="input_size must be three positive ints"):
        main(["flops", "resnet18", "--stages", "1", "--input-size", "3", "0", "32"])
    with pytest.raises(SystemExit):
        main(["flops", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--stages", "--at-flops", "--head", "--input-size", "--num-classes", "--json"):
        assert flag in help_text


class Op(torch.nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn, self.layers = fn, torch.nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(x, *self.layers)


lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
F = torch.nn.functional
# (module, input shape, hand count): the operators fvcore leaves out that FLOP_HANDLES counts
HAND_COUNTS = {
    "max_pool2d 3x3/2": (Op(lambda x: F.max_pool2d(x, 3, 2, 1)), (1, 4, 8, 8), 4 * 4 * 4 * 9),
    "avg_pool2d 2x2": (Op(lambda x: F.avg_pool2d(x, 2)), (1, 4, 8, 8), 4 * 4 * 4 * 4),
    "mean": (Op(lambda x: x.mean((2, 3))), (2, 4, 8, 8), 2 * 4 * 64),
    "sum, amax, vector norm": (Op(lambda x: x.sum(1) + x.amax(1) + torch.linalg.vector_norm(x, dim=1)), (2, 4, 8), 3 * 2 * 4 * 8),
    "attention": (Op(lambda x: F.scaled_dot_product_attention(x, x[:, :, :3], x[:, :, :3])), (2, 4, 5, 8), 2 * 4 * 5 * 3 * (8 + 8)),
    "conv padding='same'": (Op(lambda x, c: c(x), torch.nn.Conv2d(4, 6, 3, padding="same")), (1, 4, 8, 8), 6 * 8 * 8 * 4 * 9),
    "lstm, 2 layers, both ways": (Op(lambda x, m: m(x)[0], lstm), (3, 7, 8), 3 * 7 * 2 * (64 * 8 + 64 * 16 + 64 * 32 + 64 * 16)),
    "bicubic upsampling": (Op(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic")), (1, 4, 8, 8), 16 * 4 * 16 * 16),
}


@pytest.mark.parametrize("case", list(HAND_COUNTS))
def test_extra_handles_equal_a_hand_count(case):
    module, shape, expected = HAND_COUNTS[case]
    report = timm_exits.flops_report(module, example_input=torch.randn(*shape))
    batch = shape[0]
    assert report.exits[0].flops * batch == expected
    assert not report.failed_ops


def test_multihead_attention_fast_path_equals_its_explicit_ops():
    torch.manual_seed(0)
    backbone = torchvision.models.vit_b_16(num_classes=5, image_size=32).eval()
    report = timm_exits.flops_report(timm_exits.wrap(backbone, stages=[5]))  # no_grad: nn.MultiheadAttention's fused kernel
    assert "aten::_native_multi_head_attention" not in report.uncounted_ops
    with torch.enable_grad():  # with grad it runs as linear layers and scaled_dot_product_attention
        explicit = fvcore_total(backbone, torch.randn(1, 3, 32, 32))
    assert report.exits[-1].backbone_flops == explicit
