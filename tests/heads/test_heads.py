"""Heads: every built-in head on every layout, custom heads, and what each head promises."""
import pytest
import timm
import torch
from torch import nn

import timm_exits

LAYOUTS = {
    "NCHW": lambda: timm.create_model("resnet18", num_classes=5),
    "NHWC": lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, img_size=32, window_size=2),
    "NLC": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32),
}


@pytest.mark.parametrize("head", timm_exits.head_names())
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_head_on_layout(head, layout):
    torch.manual_seed(0)
    backbone = LAYOUTS[layout]()
    model = timm_exits.wrap(backbone, stages=[1, 2], head=head)
    out = model(torch.randn(3, 3, 32, 32), return_features=True)
    assert [z.shape for z in out.logits] == [(3, 5)] * 3
    assert all(f.dim() == 2 and f.shape[0] == 3 for f in out.features)
    if head in ("bottleneck", "replica"):  # these end in the final stage's width: hints need no adapter
        assert len({f.shape[1] for f in out.features}) == 1


def test_linear_head_reads_the_class_token():
    model = timm_exits.wrap(LAYOUTS["NLC"](), stages=[2]).eval()
    head = model.exits[0]
    tokens = torch.randn(2, 5, 192)
    changed = tokens.clone()
    changed[:, 1:] += 1.0  # patch tokens change, class token does not
    torch.testing.assert_close(head(tokens), head(changed))


def test_sdn_head_mixes_max_and_avg_with_a_learned_weight(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1], head="sdn")
    head = model.exits[0]
    assert isinstance(head.alpha, nn.Parameter) and head.fc.in_features == 64 * 4 * 4
    feature = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        head.alpha.fill_(1.0)
        only_max = head.features(feature)
    torch.testing.assert_close(only_max, nn.functional.adaptive_max_pool2d(feature, 4).flatten(1))


def test_bottleneck_head_matches_final_stage_resolution(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1, 2], head="bottleneck")
    strides = [h.body[1][0].stride[0] for h in model.exits]
    assert strides == [8, 4]  # layer1 is 1/4, layer2 1/8, layer4 1/32
    assert all(h.fc.in_features == 512 for h in model.exits)


def test_replica_head_owns_copies_of_later_blocks(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1], head="replica")
    head_params = {id(p) for p in model.exits.parameters()}
    assert not head_params & {id(p) for p in model.backbone.parameters()}
    # one block of each later stage: layer2.0, layer3.0, layer4.0, starting from their weights
    assert len(model.exits[0].blocks) == 3
    torch.testing.assert_close(getattr(model.exits[0].blocks[2].layer4, "0").conv1.weight, model.backbone.layer4[0].conv1.weight)


def test_callable_head_and_registration(resnet18):
    seen = []

    def tiny(channels, num_classes, layout):
        seen.append((channels, layout.format))
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    model = timm_exits.wrap(resnet18, stages=[1, 2], head=tiny)
    assert seen == [(64, "NCHW"), (128, "NCHW")]
    assert model(torch.randn(2, 3, 32, 32))[0].shape == (2, 5)

    @timm_exits.register_head("tiny-test")
    class Tiny(nn.Module):
        def __init__(self, channels, num_classes, layout):
            super().__init__()
            self.fc = nn.Linear(channels, num_classes)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    assert "tiny-test" in timm_exits.head_names()
    assert isinstance(timm_exits.wrap(resnet18, stages=[1], head="tiny-test").exits[0], Tiny)


def test_per_exit_heads(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1, 2], head=["sdn", "linear"], head_kwargs=None)
    assert [type(h).__name__ for h in model.exits] == ["SDNHead", "LinearHead"]


def test_callable_returning_a_non_module(resnet18):
    with pytest.raises(TypeError, match=r"expected an nn.Module"):
        timm_exits.wrap(resnet18, stages=[1], head=lambda c, n, layout: "nope")


# -- what each head computes on each layout, written out --------------------------------------------

LAYOUT_CASES = {
    "NCHW": LAYOUTS["NCHW"],
    "NHWC": LAYOUTS["NHWC"],
    "NLC class token": LAYOUTS["NLC"],
    "NLC mean of patch tokens":
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, global_pool="avg", reg_tokens=2),
}


def as_grid(x, fmt, prefix):
    """The feature as an NCHW map: NHWC permuted; the tokens after the prefix laid row by row on their square grid."""
    if fmt == "NHWC":
        return x.permute(0, 3, 1, 2)
    if fmt == "NLC":
        tokens = x[:, prefix:]
        side = int(tokens.shape[1] ** 0.5)
        return tokens.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)
    return x


def reference_features(head, x, fmt, token_pool, prefix):
    """The pooled vector each head's classifier reads, from the head's own layers but the layout handled here."""
    if isinstance(head, timm_exits.heads.LinearHead):
        if fmt == "NCHW":
            return x.mean((2, 3))
        pooled = x.mean((1, 2)) if fmt == "NHWC" else x[:, 0] if token_pool == "token" else x[:, prefix:].mean(1)
        norm = head.pool.norm
        return nn.functional.layer_norm(pooled, pooled.shape[1:], norm.weight, norm.bias, norm.eps)
    if isinstance(head, timm_exits.heads.SDNHead):
        a = head.alpha
        if fmt == "NLC":
            return a * x[:, prefix:].amax(1) + (1 - a) * x[:, prefix:].mean(1)
        grid = as_grid(x, fmt, prefix)
        return (a * nn.functional.adaptive_max_pool2d(grid, 4) + (1 - a) * nn.functional.adaptive_avg_pool2d(grid, 4)).flatten(1)
    if isinstance(head, timm_exits.heads.ConvHead):
        return head.convs(as_grid(x, fmt, prefix)).mean((2, 3))
    if isinstance(head, timm_exits.heads.BottleneckHead):
        return head.body(as_grid(x, fmt, prefix)).mean((2, 3))
    raise AssertionError(type(head))


@pytest.mark.parametrize("head", ["linear", "sdn", "conv", "bottleneck"])
@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
def test_head_computes_its_formula_on_each_layout(head, layout):
    torch.manual_seed(0)
    backbone = LAYOUT_CASES[layout]()
    model = timm_exits.wrap(backbone, stages=[1], head=head).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feature, _ = model.segments()[0](x)
        exit_head = model.exits[0]
        site = exit_head.layout if hasattr(exit_head, "layout") else exit_head.pool.layout
        assert site.format == layout.split()[0]
        if layout.startswith("NLC"):
            assert (site.token_pool, site.num_prefix_tokens) == (("token", 1) if "class" in layout else ("avg", 3))
        if head == "sdn":
            exit_head.alpha.fill_(0.3)  # a real mix of max and mean
        logits, pooled = exit_head(feature, return_features=True)
        expected = reference_features(exit_head, feature, site.format, site.token_pool, site.num_prefix_tokens)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, nn.functional.linear(expected, exit_head.fc.weight, exit_head.fc.bias), rtol=1e-5, atol=1e-5)
    # the prefix tokens are read only by a head that pools the class token
    if (layout.startswith("NLC") and head != "linear") or layout == "NLC mean of patch tokens":
        changed = feature.clone()
        changed[:, : site.num_prefix_tokens] += 3.0
        with torch.no_grad():
            torch.testing.assert_close(exit_head(changed), logits)
