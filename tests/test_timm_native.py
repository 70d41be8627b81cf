"""A multi-exit model behaves as a timm model does: reset_classifier, forward_features / forward_head, one exit scored as the output."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import timm_exits
from conftest import exactly


def resnet(num_classes=10, **kwargs):
    torch.manual_seed(0)
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=num_classes), stages=[1, 2, 3], input_size=(3, 32, 32), **kwargs)


def test_eval_output_as_an_exit_index_returns_that_exit():
    model = resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    every = model(x)
    for k in (0, 2, -1, -4):
        model.eval_output = k
        assert torch.equal(model(x), every[k])
    assert isinstance(model.train()(x), list)  # training still gives every exit, for the loss
    for bad in (4, -5):
        with pytest.raises(ValueError, match=exactly(f"eval_output={bad} is not an exit index: this model has 4 exits, 0..3 (or -4..-1)")):
            model.eval_output = bad
    with pytest.raises(ValueError, match=r"^eval_output must be one of"):
        model.eval_output = True
    assert timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1], input_size=(3, 32, 32), eval_output=1).eval()(x).shape == (2, 10)


def test_reset_classifier_resets_the_backbone_and_every_exit():
    model = resnet()
    features = {k: v.clone() for k, v in model.state_dict().items() if "fc" not in k and "_extra_state" not in k}
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.backbone.num_classes == 5
    assert [tuple(z.shape) for z in model.eval()(torch.randn(2, 3, 32, 32))] == [(2, 5)] * 4
    assert all(torch.equal(features[k], v) for k, v in model.state_dict().items() if k in features)  # only the classifiers are new
    assert timm_exits.flops_report(model).exits[-1].flops > 0
    copy = __import__("copy").deepcopy(model)
    assert copy.num_classes == 5 and copy(torch.randn(1, 3, 32, 32))[0].shape == (1, 5)


def test_reset_classifier_on_a_torchvision_model_replaces_its_last_linear():
    torch.manual_seed(0)
    model = timm_exits.wrap(torchvision.models.resnet18(num_classes=10), stages=[1, 2], input_size=(3, 32, 32))
    model.reset_classifier(3)
    assert model.backbone.fc.out_features == 3 and [z.shape[-1] for z in model.eval()(torch.randn(1, 3, 32, 32))] == [3, 3, 3]


def test_reset_classifier_names_what_it_cannot_do():
    model = resnet()
    with pytest.raises(ValueError, match=exactly("num_classes must be an int >= 1 (a multi-exit model needs a classifier on every exit), got 0")):
        model.reset_classifier(0)

    def plain_head(channels, num_classes, layout):
        return nn.Sequential(timm_exits.heads.FeaturePool(channels, layout), nn.Linear(channels, num_classes))

    custom = resnet(head=plain_head)
    with pytest.raises(TypeError, match=r"^the heads of exit 1 \(Sequential\), exit 2 \(Sequential\), exit 3 \(Sequential\) have no reset_classifier"):
        custom.reset_classifier(5)
    assert custom.num_classes == 10 and custom.backbone.num_classes == 10  # refused before anything changed


def test_forward_features_and_forward_head_are_the_backbones():
    model = resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert torch.equal(feats, model.backbone.forward_features(x))
    assert torch.equal(model.forward_head(feats), model(x)[-1])
    assert torch.equal(model.forward_head(feats, pre_logits=True), model.backbone.forward_head(feats, pre_logits=True))
