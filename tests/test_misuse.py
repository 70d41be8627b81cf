"""Misuse a user could make, as they would write it: each gets a clear error (or a warning where the
input is legal but almost surely a mistake) at the call, naming the argument and what is valid."""
import pickle

import pytest
import timm
import torch
import torchvision
from torch import nn

import timm_exits
from conftest import exactly
from timm_exits.cli import main


def resnet(num_classes=10, **kwargs):
    torch.manual_seed(0)
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=num_classes), stages=[1, 2, 3], input_size=(3, 32, 32), **kwargs)


# -- heads ----------------------------------------------------------------------------------------


class Unpooled(nn.Module):
    """A head that forgot to pool: its linear layer meets a (B, C, H, W) map."""

    def __init__(self, channels, num_classes, layout):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Wrong(nn.Module):
    """A head whose logits are as wide as its input's channels, not the classes."""

    def __init__(self, channels, num_classes, layout):
        super().__init__()
        self.fc = nn.Linear(channels, 13)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_a_head_of_the_wrong_width_is_refused_at_wrap():
    with pytest.raises(ValueError, match=exactly("the head of exit 1 ('layer1', Wrong) must return logits of shape (B, num_classes) = (2, 10) on a batch of 2; it returned (2, 13)")):
        resnet(head=Wrong)


def test_a_head_that_cannot_read_its_feature_is_refused_at_wrap():
    with pytest.raises(ValueError, match=r"^the head of exit 1 \('layer1', Unpooled\) cannot read its feature: on a \(2, 64, 8, 8\) feature \(NCHW\) it raised RuntimeError: .*pools it itself"):
        resnet(head=Unpooled)


@pytest.mark.parametrize("head,kwargs,message", [
    ("sdn", {"grid": 0}, "head_kwargs grid=0 builds no sdn head: it must be a positive int"),
    ("conv", {"width": 0}, "head_kwargs width=0 builds no conv head: it must be a positive int"),
    ("bottleneck", {"width": -4}, "head_kwargs width=-4 builds no bottleneck head: it must be a positive int"),
])
def test_head_kwargs_that_build_nothing(head, kwargs, message):
    with pytest.raises(ValueError, match=exactly(message)):
        resnet(head=head, head_kwargs=kwargs)


def test_a_built_in_head_is_replaced_only_on_purpose():
    with pytest.raises(ValueError, match=exactly("a head named 'linear' is already registered (LinearHead); pass register_head('linear', override=True) to replace it everywhere, or choose another name")):
        timm_exits.register_head("linear")(Wrong)
    assert resnet().exits[0].__class__.__name__ == "LinearHead"


# -- backbones that are not classifiers -------------------------------------------------------------


def test_backbones_without_a_classifier_are_refused():
    torchvision_features = torchvision.models.resnet18(num_classes=10)
    torchvision_features.fc = nn.Identity()
    with pytest.raises(ValueError, match=r"^ResNet has no classifier \(model.fc is an nn.Identity\): it returns its features, not logits; create it with"):
        timm_exits.wrap(torchvision_features, stages=[1, 2])
    timm_features = timm.create_model("resnet18", num_classes=10)
    timm_features.reset_classifier(0)
    with pytest.raises(ValueError, match=r"^ResNet has no classifier \(num_classes=0\)"):
        timm_exits.wrap(timm_features, stages=[1, 2])
    vit = torchvision.models.vit_b_16(num_classes=5, image_size=32)
    vit.heads = nn.Identity()
    with pytest.raises(ValueError, match=r"^VisionTransformer has no classifier \(model.heads is an nn.Identity\)"):
        timm_exits.wrap(vit, stages=[3])


def test_a_classifier_changed_after_wrap_is_named_at_the_next_forward():
    model = resnet().eval()
    model.backbone.reset_classifier(5)
    with pytest.raises(RuntimeError, match=r"^the backbone's head now outputs 5 classes, the exits 10: its classifier was changed after wrap\(\)"):
        model(torch.randn(2, 3, 32, 32))


def test_eval_output_is_checked_whenever_it_is_set():
    model = resnet()
    with pytest.raises(ValueError, match=exactly("eval_output must be one of ('all', 'final', 'ensemble'), got 'last'")):
        model.eval_output = "last"
    model.eval_output = "final"
    copy = pickle.loads(pickle.dumps(model))
    assert copy.eval_output == "final" and copy.eval().forward(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# -- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["stages", "resnet18", "--input-size", "3", "-5", "64"], "argument --input-size: -5 is not a positive integer"),
    (["flops", "resnet18", "--num-classes", "-3"], "argument --num-classes: -3 is not a positive integer"),
    (["demo", "--epochs", "0"], "argument --epochs: 0 is not a positive integer"),
    (["demo", "--head", "foo"], "argument --head: invalid choice: 'foo'"),
    (["demo", "--model", "resnet1O"], "timm-exits demo: error: unknown timm model 'resnet1O'; did you mean resnet18"),
    (["demo", "--stages", "9"], "timm-exits demo: error: stage index 9 is out of range: this model has 5 stages"),
    (["flops", "resnet18", "--input-size", "1", "64", "64"], "timm-exits flops: error: ResNet cannot run on an input of size [1, 64, 64]"),
    (["flops", "resnet18", "--stages", "1", "--input-size", "1", "64", "64"],
     "timm-exits flops: error: ResNet cannot run on a dummy input of input_size=(1, 64, 64): RuntimeError: Given groups=1"),
    (["flops", "resnet18", "--stages", "layer9"], "timm-exits flops: error: unknown stage 'layer9'"),
])
def test_every_bad_argument_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"timm-exits {argv[0]}: error: ")
