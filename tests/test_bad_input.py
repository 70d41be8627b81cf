"""Bad input raises at wrap() with a message a user can act on."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import timm_exits


class DataDependent(nn.Module):
    """fx cannot trace control flow on tensor values."""

    def forward(self, x):
        return x.relu() if x.mean() > 0 else x


def test_unknown_stage_name_lists_valid_ones(resnet18):
    with pytest.raises(ValueError, match=r"unknown stage 'layer9'(.|\n)*'layer1'(.|\n)*'layer3'"):
        timm_exits.wrap(resnet18, stages=["layer9"])


def test_index_out_of_range_lists_stages(resnet18):
    with pytest.raises(ValueError, match=r"stage index 7 is out of range: this model has 5 stages(.|\n)*'layer2'"):
        timm_exits.wrap(resnet18, stages=[1, 7])


@pytest.mark.parametrize("stages,word", [([2, 2], "repeated"), ([3, 1], "out of order"), (["layer2", "layer1"], "out of order")])
def test_repeated_or_unordered(resnet18, stages, word):
    with pytest.raises(ValueError, match=word):
        timm_exits.wrap(resnet18, stages=stages)


def test_empty_stages(resnet18):
    with pytest.raises(ValueError, match="stages is empty"):
        timm_exits.wrap(resnet18, stages=[])


@pytest.mark.parametrize("stage", [4, -1, "layer4", "fc"])
def test_final_stage_is_not_an_exit(resnet18, stage):
    with pytest.raises(ValueError, match="final stage or beyond"):
        timm_exits.wrap(resnet18, stages=[1, stage])


@pytest.mark.parametrize("stage", [1.5, None, True])
def test_stage_of_wrong_type(resnet18, stage):
    with pytest.raises(TypeError, match="each entry of `stages`"):
        timm_exits.wrap(resnet18, stages=[stage])


def test_unknown_head_lists_known_ones(resnet18):
    with pytest.raises(ValueError, match="unknown head 'mlp'; known heads: bottleneck, conv, linear, replica, sdn"):
        timm_exits.wrap(resnet18, stages=[1], head="mlp")


def test_head_list_of_wrong_length(resnet18):
    with pytest.raises(ValueError, match="head has 2 entries but there are 3 stages"):
        timm_exits.wrap(resnet18, stages=[1, 2, 3], head=["linear", "sdn"])


def test_num_classes_disagreeing_with_backbone(resnet18):
    with pytest.raises(ValueError, match="num_classes=10 disagrees with the backbone, whose head outputs 5 classes"):
        timm_exits.wrap(resnet18, stages=[1], num_classes=10)


def test_bad_input_size(resnet18):
    with pytest.raises(ValueError, match="input_size must be three positive ints"):
        timm_exits.wrap(resnet18, stages=[1], input_size=(32, 32))


def test_untraceable_model_names_the_module_and_the_way_out():
    model = torchvision.models.resnet18(num_classes=5)
    model.layer2[0].relu = DataDependent()
    with pytest.raises(timm_exits.TraceError, match=r"module 'layer2.0.relu' \(DataDependent\)(.|\n)*leaf_modules=\[DataDependent\]"):
        timm_exits.wrap(model, stages=[1, 2])


def test_registering_the_leaf_makes_it_traceable():
    model = torchvision.models.resnet18(num_classes=5).eval()
    model.layer2[0].relu = DataDependent()
    wrapped = timm_exits.wrap(model, stages=[1, 2], leaf_modules=[DataDependent]).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(wrapped(x)[-1], model(x), rtol=0, atol=0)


def test_untraceable_timm_model_falls_back_to_forward_intermediates():
    model = timm.create_model("resnet18", num_classes=5).eval()
    model.layer2[0].act1 = DataDependent()
    with pytest.warns(UserWarning, match="forward_intermediates: every exit is computed"):
        wrapped = timm_exits.wrap(model, stages=[1, 2])
    x = torch.randn(2, 3, 32, 32)
    wrapped.eval()
    outs = wrapped(x)
    torch.testing.assert_close(outs[-1], model(x), rtol=0, atol=0)
    assert [z.shape for z in outs] == [(2, 5)] * 3
    with torch.no_grad():  # exit k reads feature_info stage k, as timm's own API gives it
        features = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        for z, head, feature in zip(outs, wrapped.exits, features, strict=False):
            torch.testing.assert_close(z, head(feature), rtol=0, atol=0)
        pre_logits = wrapped(x, return_features=True).features[-1]
        torch.testing.assert_close(pre_logits, model.forward_head(model.forward_features(x), pre_logits=True), rtol=0, atol=0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not one of this model's feature_info stages"):
        timm_exits.wrap(model, stages=["layer2.0"])


def test_backbone_without_classifier():
    with pytest.raises(ValueError, match="has no classifier"):
        timm_exits.wrap(timm.create_model("resnet18", num_classes=0), stages=[1])


def test_backbone_returning_a_dict():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torchvision.models.resnet18(num_classes=5)

        def forward(self, x):
            return {"logits": self.body(x)}

    with pytest.raises(ValueError, match=r"must return logits of shape \(B, num_classes\) in eval mode; DictOut returned a dict"):
        timm_exits.wrap(DictOut(), stages=["body.layer1"])


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        timm_exits.wrap(lambda x: x, stages=[1])


class CachesInEval(nn.Module):
    """Memoises a derived tensor in eval mode, as timm's efficientformer does its attention biases."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.cache = {}

    def forward(self, x):
        if self.training:
            return x * (self.scale * 2)
        if "s" not in self.cache:
            self.cache["s"] = self.scale * 2
        return x * self.cache["s"]


def test_tracing_leaves_the_users_model_untouched():
    model = torchvision.models.resnet18(num_classes=5).eval()
    model.layer2[0].relu = nn.Sequential(nn.ReLU(), CachesInEval())
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    model.layer2[0].relu[1].cache.clear()
    first = timm_exits.wrap(model, stages=[1, 2])
    second = timm_exits.wrap(model, stages=[1, 3])  # a second trace must not see the first one's values
    assert not any(isinstance(v, torch.fx.Proxy) for v in model.layer2[0].relu[1].cache.values())
    torch.testing.assert_close(model(x), reference)
    torch.testing.assert_close(first.eval()(x)[-1], reference)
    torch.testing.assert_close(second.eval()(x)[-1], reference)
