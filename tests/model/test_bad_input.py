"""Bad input raises at wrap() with a message a user can act on."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import timm_exits
from conftest import DataDependent


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
    with (
        pytest.warns(UserWarning, match="forward_intermediates: every exit is computed"),
        pytest.raises(ValueError, match="not one of this model's feature_info stages"),
    ):
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
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
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


# -- as a new user met them: each got torch's words, or a message about something else -------------------------------


def digits_model(**kwargs):
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32), **kwargs)


def test_one_image_without_its_batch_dimension_is_named_as_such():
    model = digits_model().eval()
    for call in (model, model.forward_exits, lambda x: model.early_exit(x, threshold=0.5)):
        with pytest.raises(ValueError, match=r"^x of shape \(1, 32, 32\) has no batch dimension: the model takes \(B, 1, 32, 32\); "
                                             r"for one image, x.unsqueeze\(0\)$"):
            call(torch.randn(1, 32, 32))
    assert model(torch.randn(1, 1, 32, 32))[-1].shape == (1, 10)  # a batch of one is fine


@pytest.mark.parametrize("value", ["10", 10.0, 0, True])
def test_num_classes_that_is_not_a_count_is_named_before_anything_is_traced(value):
    backbone = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"^num_classes must be an int >= 1 \(a check of the backbone's number of classes; "
                                         rf"or leave it out\), got {value!r}$"):
        timm_exits.wrap(backbone, stages=[1], num_classes=value)


def test_teachers_in_a_module_list_are_each_a_teacher():
    model = digits_model()
    teachers = nn.ModuleList([timm.create_model("resnet10t", num_classes=10, in_chans=1) for _ in range(4)])  # one per exit
    task = timm_exits.MultiExitTask(model, "ekd", teachers=teachers, verbose=False)
    assert len(task.teachers) == 4 and all(isinstance(t, nn.Module) and not isinstance(t, nn.ModuleList) for t in task.teachers)
    assert task(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]))["loss"].isfinite()
    with pytest.raises(TypeError, match=r"got an nn.ModuleDict: pass list\(teachers.values\(\)\)"):
        timm_exits.MultiExitTask(model, "ekd", teachers=nn.ModuleDict({"a": teachers[0]}), verbose=False)


def test_a_backbone_replaced_after_wrap_by_another_architecture_is_refused_naming_both():
    x = torch.randn(2, 3, 32, 32)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1, 2], input_size=(3, 32, 32)).eval()
    before, weights = [z.clone() for z in model(x)], model.backbone.state_dict()
    for other, now, was in [(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32), "patch_embed", "conv1"),
                            (timm.create_model("resnet34", num_classes=10), "layer1.2", "layer2")]:  # deeper: the graph would skip blocks
        model.backbone = other
        with pytest.raises(ValueError, match=rf"^model.backbone was replaced by a {type(other).__name__} whose modules differ from the "
                                             rf"ResNet the exits were cut from \(first: '{now}' where it had '{was}'\)"):
            model(x)
    twin = timm.create_model("resnet18", num_classes=10).eval()
    twin.load_state_dict(weights)  # the same architecture with the same weights: the same outputs
    model.backbone = twin
    assert all(torch.equal(a, b) for a, b in zip(model(x), before))


def test_a_batchnorm_head_trained_on_a_batch_of_one_names_the_head_and_the_fix():
    model = digits_model(head="conv").train()
    with pytest.raises(ValueError, match=r"^the ConvHead after 'layer2' normalises over the batch \(BatchNorm\) in training, "
                                         r"and this batch "
                                         r"gives it one value per channel .*: train with batches of 2 or more"):
        model(torch.randn(1, 1, 32, 32))


def test_the_flops_table_shows_no_head_for_the_backbones_own():
    report = timm_exits.flops_report(digits_model())
    last = str(report).splitlines()[5].split()
    assert last[:4] == ["4", "final", "backbone's", "own"] and last[5] == "-", last
    assert "| -  " not in report.to_markdown() and "|             - |" in report.to_markdown()
