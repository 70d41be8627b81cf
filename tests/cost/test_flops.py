"""Per-exit FLOPs: each exit's count equals an independent count of the truncated backbone.

The references never use timm_exits' own handles: they are fvcore as it ships plus the operators it
skips written out by hand, torch's FlopCounterMode, or a hand count of the whole model.
"""
import functools
import json
import math

import pytest
import timm
import torch
import torchvision
from fvcore.nn import FlopCountAnalysis
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor

import timm_exits
from timm_exits.cli import main
from timm_exits.cost import FLOP_HANDLES


def shipped_fvcore(module, x) -> FlopCountAnalysis:
    """fvcore as it ships (none of timm_exits' handles) on `module` in eval mode, already run."""
    analysis = FlopCountAnalysis(module.eval(), (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.total()
    return analysis


def fvcore_plus(module, x, by_hand: dict[str, int]) -> int:
    """fvcore as it ships plus `by_hand`: the FLOPs of each operator it skips that timm_exits counts, written out in the test.

    The operators given must be exactly those fvcore skipped, so the reference leaves nothing out.
    """
    analysis = shipped_fvcore(module, x)
    assert set(analysis.unsupported_ops()) & set(FLOP_HANDLES) == set(by_hand)
    return analysis.total() + sum(by_hand.values())


def vit_tiny(img_size=32, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=img_size, **kwargs)


# vit_tiny at 32x32: 4 patches of 16x16 + the class token = 5 tokens of 192 channels, 3 heads of 64
TOKENS, DIM = 5, 192
NORM = TOKENS * DIM * 5  # fvcore's layer norm: 5 FLOPs per element with an affine weight
ATTENTION = TOKENS * TOKENS * (DIM + DIM)  # q k^T, then (.) v: L x S x (d + dv) per head, over the heads


def vit_tiny_flops(blocks: int) -> int:
    """vit_tiny at 32x32 through its first `blocks` blocks, by hand: the patch embedding (a 16x16 conv), then per
    block two norms, qkv, attention, the output projection and the 4x MLP."""
    patch_embed = 4 * DIM * 3 * 16 * 16
    block = 2 * NORM + TOKENS * DIM * 3 * DIM + ATTENTION + TOKENS * DIM * DIM + 2 * TOKENS * DIM * 4 * DIM
    return patch_embed + blocks * block


def test_resnet_exits_equal_the_truncated_backbone():
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=5).eval()
    model = timm_exits.wrap(backbone, stages=["layer1", "layer2", "layer3"])
    report = timm_exits.flops_report(model, input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    stem_pool = {"aten::max_pool2d": 64 * 8 * 8 * 9}  # conv1 leaves 64 x 16 x 16; the 3x3/2 max pool reads 9 per output of 64 x 8 x 8
    for cost, stage in zip(report.exits, model.stages):
        truncated = create_feature_extractor(backbone, return_nodes={stage: "out"})
        assert cost.stage == stage
        assert cost.backbone_flops == fvcore_plus(truncated, x, stem_pool)
        assert cost.flops == cost.backbone_flops + cost.head_flops
    assert report.exits[-1].backbone_flops == fvcore_plus(backbone, x, stem_pool)
    assert report.exits[-1].share == 1.0 and report.exits[-1].head_flops == 0
    shares = [e.share for e in report.exits]
    assert shares == sorted(shares) and shares[0] > 0


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
        assert cost.backbone_flops == fvcore_plus(Truncated(k), x, {"aten::scaled_dot_product_attention": (k + 1) * ATTENTION})
    assert report.exits[-1].backbone_flops == fvcore_plus(backbone, x, {"aten::scaled_dot_product_attention": 12 * ATTENTION})
    assert "aten::scaled_dot_product_attention" not in report.uncounted_ops
    # the fused kernel counts what the explicit matmuls count (fvcore's own matmul handle)
    for block in backbone.blocks:
        block.attn.fused_attn = False
    unfused = timm_exits.flops_report(model)
    assert [e.flops for e in unfused.exits] == [e.flops for e in report.exits]


def test_last_exit_equals_fvcore_on_the_unwrapped_model():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet50", num_classes=5).eval()
    model = timm_exits.wrap(backbone, stages=[1, 2, 3])
    report = timm_exits.flops_report(model, input_size=(3, 224, 224))
    stem_pool = {"aten::max_pool2d": 64 * 56 * 56 * 9}  # 3x3/2 max pool from 112x112 to 56x56
    assert report.exits[-1].backbone_flops == fvcore_plus(backbone, torch.randn(1, 3, 224, 224), stem_pool)
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
    without_attention = shipped_fvcore(backbone, torch.randn(1, 3, 224, 224)).total() - 12 * 2 * 3 * 197 * 197 * 64
    assert not math.isclose(without_attention, reference, rel_tol=0.02)  # the check can tell


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the markdown table's exit rows."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()[4:] if line.startswith("| ")]


def test_report_formats():
    model = timm_exits.wrap(vit_tiny(), stages=[3, 6], head=["linear", "sdn"])
    report = timm_exits.flops_report(model)
    # by hand: the backbone ends with a norm of every token and its classifier on the class token; the linear head
    # norms the class token (5 FLOPs per channel) and maps it to 5 classes; the SDN head takes the max and the mean
    # of the 4 patch tokens (one FLOP per element each), then the same matmul
    backbone = [vit_tiny_flops(4), vit_tiny_flops(7), vit_tiny_flops(12) + NORM + DIM * 5]
    heads = [5 * DIM + DIM * 5, 2 * 4 * DIM + DIM * 5, 0]
    head_params = [2 * DIM + DIM * 5 + 5, 1 + DIM * 5 + 5, 0]  # norm weight and bias, fc; SDN's alpha, fc
    first_blocks = ("cls_token", "pos_embed", "patch_embed", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")
    first_params = sum(p.numel() for n, p in model.backbone.named_parameters() if n.startswith(first_blocks))

    data = json.loads(report.to_json())
    assert data["model"] == "vit_tiny_patch16_224" and data["input_size"] == [3, 32, 32]
    assert data["backbone_flops"] == backbone[-1] and data["all_exits_flops"] == backbone[-1] + sum(heads)
    exits = data["exits"]
    assert [e["exit"] for e in exits] == [1, 2, 3] and "index" not in exits[0]  # numbered as the printed table
    assert [e["stage"] for e in exits] == ["blocks.3", "blocks.6", "final"]
    assert [e["head"] for e in exits] == ["LinearHead", "SDNHead", "backbone's own"]
    assert [e["backbone_flops"] for e in exits] == backbone and [e["head_flops"] for e in exits] == heads
    assert [e["flops"] for e in exits] == [b + h for b, h in zip(backbone, heads)]
    assert [e["share"] for e in exits] == [(b + h) / backbone[-1] for b, h in zip(backbone, heads)] and exits[-1]["share"] == 1.0
    assert [e["head_params"] for e in exits] == head_params
    assert exits[0]["backbone_params"] == first_params
    assert exits[-1]["backbone_params"] == sum(p.numel() for p in model.backbone.parameters())
    assert all(e["params"] == e["backbone_params"] + e["head_params"] for e in exits)
    for row, cost in zip(exits, report.exits):  # the JSON carries the attributes unchanged, the exit numbered from 1
        assert row == {"exit": cost.index + 1, **{field: getattr(cost, field) for field in row if field != "exit"}}
    assert "aten::gelu" in data["uncounted_ops"] and not set(data["uncounted_ops"]) & set(FLOP_HANDLES)

    # ~27 MFLOPs: the table shows MFLOPs to 4 digits, shares to 0.1 %, parameters in millions to 3 digits
    md = report.to_markdown()
    header = next(line for line in md.splitlines() if line.startswith("| "))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "exit", "attached after", "head", "backbone MFLOPs", "head MFLOPs", "total MFLOPs", "share", "params (M)"
    ]
    rows = table_rows(md)
    assert [r[:3] for r in rows] == [["1", "blocks.3", "LinearHead"], ["2", "blocks.6", "SDNHead"], ["3", "final", "backbone's own"]]
    for row, e in zip(rows, exits):
        flops = [0.0 if c == "-" and e["head"] == "backbone's own" else float(c) * 1e6 for c in row[3:6]]  # its head is the backbone's
        share, params = float(row[6].rstrip("%")) / 100, float(row[7]) * 1e6
        assert flops == pytest.approx([e["backbone_flops"], e["head_flops"], e["flops"]], rel=5e-4)
        assert share == pytest.approx(e["share"], abs=5e-4) and params == pytest.approx(e["params"], rel=5e-3)
    assert rows[-1][6] == "100.0%"
    text = str(report).splitlines()
    assert "one fused multiply-add = 1 FLOP" in text[0]
    assert [line.split() for line in text[2:5]] == [" ".join(r).split() for r in rows]  # the printed table shows the same cells
    all_exits = next(line for line in text if line.startswith("all exits computed"))
    assert float(all_exits.split(": ")[1].removesuffix(" MFLOPs")) * 1e6 == pytest.approx(data["all_exits_flops"], rel=5e-4)
    assert any(line.startswith("uncounted operators: ") and "aten::gelu" in line for line in text)


def test_example_input_counts_per_sample_and_mode_is_restored(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1, 2]).train()
    one = timm_exits.flops_report(model, input_size=(3, 32, 32))
    batch = timm_exits.flops_report(model, example_input=torch.randn(4, 3, 32, 32))
    assert [e.flops for e in batch.exits] == [e.flops for e in one.exits]
    assert model.training and all(m.training for m in model.modules())


def test_plain_model_is_one_exit_with_a_note(resnet18):
    report = timm_exits.flops_report(resnet18, input_size=(3, 32, 32))
    assert len(report.exits) == 1 and report.exits[0].share == 1.0
    stem_pool = {"aten::max_pool2d": 64 * 8 * 8 * 9}  # 3x3/2 max pool from 16x16 to 8x8
    assert report.exits[0].flops == fvcore_plus(resnet18, torch.randn(1, 3, 32, 32), stem_pool)
    assert any("not a MultiExitModel" in note for note in report.notes)


def test_forward_intermediates_fallback_is_counted_per_exit():
    from conftest import DataDependent

    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=5).eval()
    traceable = timm_exits.flops_report(timm_exits.wrap(backbone, stages=[1, 2]), input_size=(3, 32, 32))
    backbone.layer2[0].act1 = DataDependent()
    with pytest.warns(UserWarning, match="forward_intermediates: every exit is computed"):
        model = timm_exits.wrap(backbone, stages=[1, 2])
    report = timm_exits.flops_report(model, input_size=(3, 32, 32))
    assert [e.flops for e in report.exits] == [e.flops for e in traceable.exits]
    assert [e.params for e in report.exits] == [e.params for e in traceable.exits]
    assert any("its own trace" in note for note in report.notes)
    with pytest.warns(UserWarning, match="forward_intermediates: every exit is computed"):
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
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
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


@pytest.mark.parametrize(
    "args, match",
    [
        ((), "at least one"),
        ((0.5, 0.25), "must increase"),
        ((0.0,), "strictly between"),
        ((1.5,), "strictly between"),
        ((True,), "strictly between"),
    ],
)
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
    with pytest.raises(SystemExit) as bad_size:
        main(["flops", "resnet18", "--stages", "1", "--input-size", "3", "0", "32"])
    assert bad_size.value.code == 2 and "--input-size: 0 is not a positive integer" in capsys.readouterr().err
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


F = torch.nn.functional
lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)  # batch first, eval, no grad: the fused fast path
upsample = functools.partial(F.interpolate, scale_factor=2)
# case -> (operator, module, input shape, FLOPs of the whole batch by hand); every operator in FLOP_HANDLES has a case
HAND_COUNTS = {
    # windowed pooling: every element of every window read once, output elements x kernel area
    "max_pool1d 3/2": ("aten::max_pool1d", Op(lambda x: F.max_pool1d(x, 3, 2)), (2, 4, 9), 2 * 4 * 4 * 3),
    "max_pool2d 3x3/2": ("aten::max_pool2d", Op(lambda x: F.max_pool2d(x, 3, 2, 1)), (1, 4, 8, 8), 4 * 4 * 4 * 9),
    "max_pool2d 3x1": ("aten::max_pool2d", Op(lambda x: F.max_pool2d(x, (3, 1))), (1, 4, 9, 9), 4 * 3 * 9 * 3),
    "max_pool3d 2x2x2": ("aten::max_pool3d", Op(lambda x: F.max_pool3d(x, 2)), (1, 2, 4, 4, 4), 2 * 2 * 2 * 2 * 8),
    "avg_pool1d 3": ("aten::avg_pool1d", Op(lambda x: F.avg_pool1d(x, 3)), (2, 4, 9), 2 * 4 * 3 * 3),
    "avg_pool2d 2x2": ("aten::avg_pool2d", Op(lambda x: F.avg_pool2d(x, 2)), (1, 4, 8, 8), 4 * 4 * 4 * 4),
    "avg_pool3d 2x2x1": ("aten::avg_pool3d", Op(lambda x: F.avg_pool3d(x, (2, 2, 1))), (1, 2, 4, 4, 4), 2 * 2 * 2 * 4 * 4),
    # reductions and adaptive pooling: one FLOP per input element
    "mean": ("aten::mean", Op(lambda x: x.mean((2, 3))), (2, 4, 8, 8), 2 * 4 * 64),
    "sum": ("aten::sum", Op(lambda x: x.sum(1)), (2, 4, 8), 2 * 4 * 8),
    "amax": ("aten::amax", Op(lambda x: x.amax(1)), (2, 4, 8), 2 * 4 * 8),
    "vector norm": ("aten::linalg_vector_norm", Op(lambda x: torch.linalg.vector_norm(x, dim=1)), (2, 4, 8), 2 * 4 * 8),
    "adaptive_max_pool1d": ("aten::adaptive_max_pool1d", Op(lambda x: F.adaptive_max_pool1d(x, 3)), (2, 4, 9), 2 * 4 * 9),
    "adaptive_max_pool2d": ("aten::adaptive_max_pool2d", Op(lambda x: F.adaptive_max_pool2d(x, 2)), (1, 4, 6, 6), 4 * 36),
    "adaptive_avg_pool1d": ("aten::adaptive_avg_pool1d", Op(lambda x: F.adaptive_avg_pool1d(x, 3)), (2, 4, 9), 2 * 4 * 9),
    "adaptive_avg_pool3d": ("aten::adaptive_avg_pool3d", Op(lambda x: F.adaptive_avg_pool3d(x, 2)), (1, 2, 4, 4, 4), 2 * 64),
    # interpolation: each output element mixes 2 (linear), 8 (trilinear) or 16 (bicubic) input points
    "linear upsampling": ("aten::upsample_linear1d", Op(lambda x: upsample(x, mode="linear")), (1, 4, 8), 2 * 4 * 16),
    "trilinear upsampling": ("aten::upsample_trilinear3d", Op(lambda x: upsample(x, mode="trilinear")), (1, 2, 4, 4, 4), 8 * 2 * 8 * 8 * 8),
    "bicubic upsampling": ("aten::upsample_bicubic2d", Op(lambda x: upsample(x, mode="bicubic")), (1, 4, 8, 8), 16 * 4 * 16 * 16),
    # RMSNorm as fvcore counts layer norm: 4 FLOPs per element, 5 with an affine weight
    "rms_norm": ("aten::rms_norm", Op(lambda x: F.rms_norm(x, (8,))), (2, 4, 8), 4 * 2 * 4 * 8),
    "rms_norm with weight": ("aten::rms_norm", Op(lambda x, m: m(x), torch.nn.RMSNorm(8)), (2, 4, 8), 5 * 2 * 4 * 8),
    # multiply-adds
    "attention, dv != d": (
        "aten::scaled_dot_product_attention",
        Op(lambda x: F.scaled_dot_product_attention(x, x[:, :, :3], x[:, :, :3, :6])),
        (2, 4, 5, 8),
        2 * 4 * 5 * 3 * (8 + 6),  # q: 5 queries, k: 3 keys of 8, v: 3 values of 6; L x S x (d + dv) per batch and head
    ),
    "conv padding='same', 2 groups": (
        "aten::_convolution_mode",
        Op(lambda x, c: c(x), torch.nn.Conv2d(4, 6, 3, padding="same", groups=2)),
        (1, 4, 8, 8),
        6 * 8 * 8 * 2 * 9,  # each of 6 x 8 x 8 outputs reads its group's 2 channels x 3 x 3
    ),
    "lstm, 2 layers, both ways": (
        "aten::lstm",
        Op(lambda x, m: m(x)[0], lstm),
        (3, 7, 8),
        3 * 7 * 2 * (64 * 8 + 64 * 16 + 64 * 32 + 64 * 16),  # per step and way: 4 gates x 16 from the input (8, then 2 x 16) and state (16)
    ),
    "lstm over a packed sequence": (  # the same work as above
        "aten::lstm",
        Op(lambda x, m: m(pack_padded_sequence(x, torch.full((3,), 7), batch_first=True))[0].data, lstm),  # 3 sequences of 7 steps
        (3, 7, 8),
        3 * 7 * 2 * (64 * 8 + 64 * 16 + 64 * 32 + 64 * 16),
    ),
    "multi-head attention fast path": (
        "aten::_native_multi_head_attention",
        Op(lambda x, m: m(x, x, x, need_weights=False)[0], mha),
        (2, 5, 8),
        4 * 2 * 5 * 8 * 8 + 2 * 2 * 5 * 5 * (4 + 4),  # 2 x 5 tokens through q, k, v, out (8 x 8); 2 heads of 4: L x S x (d + dv)
    ),
}
@pytest.mark.parametrize("case", list(HAND_COUNTS))
def test_extra_handles_equal_a_hand_count(case):
    op, module, shape, expected = HAND_COUNTS[case]
    x = torch.randn(*shape)
    with torch.no_grad():  # as flops_report traces it (nn.MultiheadAttention takes its fast path only without grad)
        shipped = shipped_fvcore(module, x)
    # the operator is in the trace, and it is the only work: fvcore as shipped skips it and counts nothing else
    assert set(shipped.unsupported_ops()) & set(FLOP_HANDLES) == {op} and shipped.total() == 0
    report = timm_exits.flops_report(module, example_input=x)
    assert report.exits[0].flops * shape[0] == expected
    assert not report.failed_ops


def test_every_extra_handle_has_a_hand_count():
    missing = set(FLOP_HANDLES) - {op for op, *_ in HAND_COUNTS.values()}
    assert not missing, f"add a case to HAND_COUNTS for {sorted(missing)}"


def test_multihead_attention_fast_path_is_counted_by_hand():
    torch.manual_seed(0)
    backbone = torchvision.models.vit_b_16(num_classes=5, image_size=32).eval()
    report = timm_exits.flops_report(timm_exits.wrap(backbone, stages=[5]))  # no_grad: nn.MultiheadAttention's fused kernel
    assert "aten::_native_multi_head_attention" not in report.uncounted_ops
    # 32x32 in 16x16 patches: 4 tokens + the class token, 768 channels, 12 layers
    tokens, dim = 5, 768
    attention = tokens * tokens * (dim + dim)  # q k^T and (.) v: L x S x (d + dv) per head, over the heads
    projections = 4 * tokens * dim * dim  # q, k, v and out
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fused = fvcore_plus(backbone, x, {"aten::_native_multi_head_attention": 12 * (projections + attention)})
    assert report.exits[-1].backbone_flops == fused
    # with grad it runs as linear layers (fvcore counts them) and scaled_dot_product_attention
    with torch.enable_grad():
        assert fvcore_plus(backbone, x, {"aten::scaled_dot_product_attention": 12 * attention}) == fused
