"""Misuse a user could make, as they would write it: each gets a clear error (or a warning where the
input is legal but almost surely a mistake) at the call, naming the argument and what is valid."""
import copy
import io
import math
import os
import pickle
import re
import subprocess
import sys
import warnings

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
    with pytest.raises(ValueError, match=exactly(
        "the head of exit 1 ('layer1', Wrong) must return logits of shape (B, num_classes) = (2, 10) on a batch of 2; it returned (2, 13)"
    )):
        resnet(head=Wrong)


def test_a_head_that_cannot_read_its_feature_is_refused_at_wrap():
    with pytest.raises(ValueError, match=r"^the head of exit 1 \('layer1', Unpooled\) cannot read its feature: "
                                         r"on a \(2, 64, 8, 8\) feature \(NCHW\) it raised RuntimeError: .*pools it itself"):
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
    with pytest.raises(ValueError, match=exactly(
        "a head named 'linear' is already registered (LinearHead); "
        "pass register_head('linear', override=True) to replace it everywhere, or choose another name"
    )):
        timm_exits.register_head("linear")(Wrong)
    assert resnet().exits[0].__class__.__name__ == "LinearHead"


# -- backbones that are not classifiers -------------------------------------------------------------


def test_backbones_without_a_classifier_are_refused():
    torchvision_features = torchvision.models.resnet18(num_classes=10)
    torchvision_features.fc = nn.Identity()
    with pytest.raises(ValueError, match=r"^ResNet has no classifier \(model.fc is an nn.Identity\): "
                                         r"it returns its features, not logits; create it with"):
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
    with pytest.raises(RuntimeError,
                       match=r"^the backbone's head now outputs 5 classes, the exits 10: its classifier was changed after wrap\(\)"):
        model(torch.randn(2, 3, 32, 32))


def test_eval_output_is_checked_whenever_it_is_set():
    model = resnet()
    with pytest.raises(ValueError,
                       match=exactly("eval_output must be one of ('all', 'final', 'ensemble') or an exit index 0..3, got 'last'")):
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
    (["flops", "resnet18", "--input-size", "1", "64", "64"],
     "timm-exits flops: error: ResNet cannot run on an input of shape (1, 1, 64, 64) (from input_size), "
     "where it runs on its own (3, 224, 224): RuntimeError: Given groups=1"),
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


# -- losses and ensembles ---------------------------------------------------------------------------

LOSS_NAMES = timm_exits.loss_names()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_an_empty_batch_is_an_error_not_a_nan(name):
    loss = timm_exits.create_loss(name, num_exits=3, epochs=2)
    empty = [torch.zeros(0, 5, requires_grad=True) for _ in range(3)]
    with pytest.raises(ValueError, match=exactly(
        "the batch is empty (the exits' logits have batch size 0): there is no loss to compute; skip the step"
    )):
        loss(empty, torch.zeros(0, dtype=torch.long))


def test_a_target_outside_the_classes_is_named():
    loss = timm_exits.MultiExitCELoss()
    logits = [torch.randn(3, 5) for _ in range(2)]
    with pytest.raises(ValueError, match=exactly(
        "target holds class 5, outside [0, 5) for 5-class logits (unlabeled samples take ignore_index=-100)"
    )):
        loss(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"target holds class -1"):
        loss(logits, torch.tensor([0, -1, 1]))
    assert torch.isfinite(loss(logits, torch.tensor([0, -100, 4])))  # ignore_index is not a class


@pytest.mark.parametrize("call,message", [
    (lambda z: timm_exits.exit_ensemble(z, weights=[1, -1, 1]), "weights must be non-negative with a positive sum, got [1.0, -1.0, 1.0]"),
    (lambda z: timm_exits.exit_ensemble(z, weights=[0, 0, 0]), "weights must be non-negative with a positive sum, got [0.0, 0.0, 0.0]"),
    (lambda z: timm_exits.exit_ensemble(z, weights=[1, float("inf"), 1]),
     "weights must be non-negative with a positive sum, got [1.0, inf, 1.0]"),
    (lambda z: timm_exits.anytime_ensemble(z, weights=[0, 1, 1]),
     "weights[0] must be positive: the anytime ensemble after exit 1 is exit 1 alone, normalised by its weight; got [0.0, 1.0, 1.0]"),
])
def test_ensemble_weights_that_give_no_ensemble(call, message):
    z = [torch.randn(2, 4) for _ in range(3)]
    with pytest.raises(ValueError, match=exactly(message)):
        call(z)
    assert torch.isfinite(timm_exits.exit_ensemble(z, weights=[0, 1, 1])).all()  # leaving an exit out is fine


# -- early exit and calibration ---------------------------------------------------------------------


@pytest.mark.parametrize("threshold,criterion,message", [
    (90, "max_prob", "threshold 90 is above 1, the most a max_prob confidence can be: no sample leaves at that exit"),
    (-0.5, "margin", "threshold -0.5 is below 0: every sample leaves at that exit"),
    (-1.0, "entropy", "entropy threshold -1 is below 0, the least an entropy can be: no sample leaves at that exit"),
])
def test_thresholds_no_confidence_can_reach_are_warned_about(threshold, criterion, message):
    model = resnet().eval()
    with pytest.warns(UserWarning, match=message) as caught:
        model.early_exit(torch.randn(2, 3, 32, 32), threshold=threshold, criterion=criterion)
    if "MUTANT_UNDER_TEST" in os.environ:  # mutmut's trampoline is one frame between this test and the library
        assert not caught[0].filename.startswith(os.path.dirname(timm_exits.__file__))
    else:
        assert caught[0].filename == __file__  # the warning points at the caller's line
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.early_exit(torch.randn(2, 3, 32, 32), threshold=float("inf"), criterion=criterion)  # inf on purpose: silent


def test_thresholds_at_the_ends_of_the_confidence_range_are_silent():
    # 1 and 0 are confidences a sample can have, and -inf / inf are on purpose: only a value past the range is a mistake
    model = resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for criterion in ("max_prob", "margin", "entropy"):
            model.early_exit(x, threshold=[-math.inf, 0.0, 0.5] if criterion == "entropy" else [1.0, 0.0, 0.5], criterion=criterion)
            model.early_exit(x, threshold=-math.inf, criterion=criterion)
    with pytest.warns(UserWarning, match="above 1") as caught:
        model.early_exit(x, threshold=[0.5, 1.5, 90], criterion="max_prob")
    assert [str(w.message) for w in caught] == [
        "threshold 1.5 is above 1, the most a max_prob confidence can be: no sample leaves at that exit "
        "(a probability: 0.9, not 90; inf keeps everyone on purpose)"
    ]
    for criterion, message in [
        ("margin", "threshold -0.5 is below 0: every sample leaves at that exit (margin is at least 0; -inf on purpose)"),
        ("entropy", "entropy threshold -0.5 is below 0, the least an entropy can be: no sample leaves at that exit"),
    ]:
        with pytest.warns(UserWarning, match="below 0") as caught:
            model.early_exit(x, threshold=[0.5, -0.5, -2.0], criterion=criterion)
        assert [str(w.message) for w in caught] == [message]


def test_thresholds_as_numpy_or_tensor_scalars():
    import numpy as np

    model = resnet().eval()
    x = torch.randn(3, 3, 32, 32)
    want = model.early_exit(x, threshold=0.5)
    for threshold in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array([0.5, 0.5, 0.5])):
        assert torch.equal(model.early_exit(x, threshold=threshold).exit_index, want.exit_index)


def cached_exits(n=40, labels=None):
    torch.manual_seed(1)
    logits = torch.randn(3, n, 4) * 2
    return timm_exits.CachedExits(logits, torch.randint(0, 4, (n,)) if labels is None else labels, [1.0, 2.0, 3.0], ["a", "b", "final"])


def test_a_calibration_is_used_with_the_ensemble_setting_it_was_made_for():
    calibration = timm_exits.calibrate_thresholds(cached_exits(), 2.0)
    with pytest.raises(ValueError, match=exactly(
        "the calibration was made with ensemble=False, not ensemble=True: its thresholds are for other scores"
    )):
        timm_exits.evaluate_thresholds(cached_exits(), calibration, ensemble=True)


def test_one_logit_models_need_a_criterion_that_is_not_a_softmax():
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=1), stages=[1, 2], input_size=(3, 32, 32)).eval()
    with pytest.raises(ValueError, match=r"^criterion='max_prob' reads a softmax, which is always 1 over one logit"):
        model.early_exit(torch.randn(2, 3, 32, 32))
    result = model.early_exit(torch.randn(2, 3, 32, 32), threshold=0.2, criterion=lambda z: (z.sigmoid() - 0.5).abs().squeeze(1))
    assert result.logits.shape == (2, 1)
    with pytest.raises(ValueError, match=exactly(
        "the model outputs one logit per sample: thresholds need class logits (CachedExits says why); "
        "early_exit takes a callable criterion instead"
    )):
        timm_exits.collect_exit_logits(model, [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))], progress=False)
    with pytest.raises(ValueError, match=r"^logits hold one logit per sample \(C = 1\): thresholds read a prediction as the argmax"):
        # it used to send everyone out at exit 1
        timm_exits.CachedExits(torch.randn(3, 4, 1), torch.zeros(4, dtype=torch.long), [1.0, 2.0, 3.0], ["a", "b", "final"])


def test_cached_labels_outside_the_classes_are_refused():
    """A label of C was counted as an error without a word."""
    with pytest.raises(ValueError, match=exactly(
        "labels hold class 4, outside [0, 4) for 4-class logits (unlabeled samples take a negative label)"
    )):
        timm_exits.CachedExits(torch.randn(3, 2, 4), torch.tensor([0, 4]), [1.0, 2.0, 3.0], ["a", "b", "final"])


def test_empty_cached_exits_are_refused():
    with pytest.raises(ValueError, match=exactly(
        "logits hold no samples (shape (num_exits, 0, C)): thresholds need cached exits of at least one sample"
    )):
        timm_exits.CachedExits(torch.zeros(3, 0, 4), torch.zeros(0, dtype=torch.long), [1.0, 2.0, 3.0], ["a", "b", "final"])


def test_unlabeled_samples_do_not_count_as_errors():
    labeled = cached_exits()
    predictions = labeled.logits.argmax(-1)
    labels = predictions[-1].clone()  # the last exit is right on every sample...
    labels[:10] = -100  # ...and a quarter of them carry no label
    cached = cached_exits(labels=labels)
    assert timm_exits.anytime_accuracy(cached)[-1].accuracy == 1.0
    assert timm_exits.evaluate_thresholds(cached, float("inf")).accuracy == 1.0
    assert timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.0).accuracy == 1.0


def test_budgets_as_numpy_or_tensor_scalars():
    import numpy as np

    cached = cached_exits()
    want = timm_exits.calibrate_thresholds(cached, 2.0).thresholds
    for budget in (np.float32(2.0), np.int64(2), torch.tensor(2.0)):
        assert timm_exits.calibrate_thresholds(cached, budget).thresholds == want


def test_a_loader_of_two_image_sizes_averages_what_the_samples_cost():
    model = resnet().eval()
    small, large = torch.randn(3, 3, 32, 32), torch.randn(1, 3, 64, 64)
    cached = timm_exits.collect_exit_logits(model, [(small, torch.zeros(3, dtype=torch.long)), (large, torch.zeros(1, dtype=torch.long))])

    def spent(size):  # leaving at exit k: the backbone up to k and every head up to k
        exits = timm_exits.flops_report(model, input_size=(3, size, size)).exits
        return [e.backbone_flops + sum(h.head_flops for h in exits[: k + 1]) for k, e in enumerate(exits)]

    small_cost, large_cost = spent(32), spent(64)
    assert small_cost != large_cost
    assert cached.flops == pytest.approx([(3 * a + b) / 4 for a, b in zip(small_cost, large_cost)])


# -- stage indices mean what timm says ------------------------------------------------------------


def test_a_timm_stage_index_is_its_feature_info_index():
    model = timm.create_model("hrnet_w18_small", num_classes=5)  # feature_info: stem, stage1, stage2, stage3, stage4
    table = timm_exits.list_stages(model, input_size=(3, 64, 64))
    assert [s.name for s in table] == [i["module"] for i in model.feature_info] and [s.index for s in table] == [0, 1, 2, 3, 4]
    # stem and stage1 name modules of timm's features_only model; the classifier's stage2-4 end in their
    # lowest-resolution branch (32-128 channels), not the merged 256-1024-channel features feature_info describes
    assert not any(s.usable for s in table) and not any(s.final for s in table)
    with pytest.raises(ValueError, match=r"^stage 1 \('stage1'\) cannot take an exit: the classifier has no module 'stage1' "
                                         r"\(feature_info names timm's features_only model\)"):
        timm_exits.wrap(model, stages=[1], input_size=(3, 64, 64))
    with pytest.raises(ValueError, match=r"^stage 3 \('stage3'\) cannot take an exit: the classifier's 'stage3' ends in "
                                         r"a 64-channel tensor, not the 512-channel feature feature_info\[3\] describes"):
        timm_exits.wrap(model, stages=[3], input_size=(3, 64, 64))
    wrapped = timm_exits.wrap(model, stages=["layer1"], input_size=(3, 64, 64))  # by the classifier's own module name
    assert [tuple(z.shape) for z in wrapped(torch.randn(2, 3, 64, 64))] == [(2, 5)] * 2


@pytest.mark.parametrize("name, size, refused", [
    ("resnet18", (3, 64, 64), []),
    ("efficientvim_m1", (3, 224, 224), [0, 1]),
    ("crossvit_tiny_240", (3, 240, 240), [0, 1, 2]),
])
def test_every_row_that_takes_an_exit_gives_its_head_the_width_the_table_says(name, size, refused):
    """efficientvim's stage modules end in the next stage's downsampling, and crossvit lists each block once per
    scale while the block ends in its wider branch: the rows whose module does not output feature_info's width are
    refused by name, where they used to be cut at another width than the table showed."""
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}: it came in a later release")
    model = timm.create_model(name, num_classes=5)
    if not getattr(model, "feature_info", None):
        pytest.skip(f"timm {timm.__version__}'s {name} has no feature_info: the rows under test are those later releases list")
    table = timm_exits.list_stages(model, input_size=size)
    assert [s.index for s in table if not s.usable] == refused and all("-channel tensor, not the" in table[i].reason for i in refused)
    rows = [s for s in table if s.usable and not s.final]
    if not rows:  # efficientvim: only its final row; exits go after its own modules, by name
        return
    wrapped = timm_exits.wrap(model, stages=[s.index for s in rows], input_size=size)
    seen = []
    for head in wrapped.exits:
        head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1] if args[0].dim() == 4 else args[0].shape[-1]))
    wrapped.eval()(torch.randn(1, *size))
    assert seen == [s.channels for s in rows]


@pytest.mark.parametrize("build", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small])
def test_torchvision_indices_do_not_depend_on_the_input_size(build):
    model = build(num_classes=5)
    own = [s.name for s in timm_exits.list_stages(model)]
    assert [s.name for s in timm_exits.list_stages(model, input_size=(3, 32, 32))] == own
    wrapped = timm_exits.wrap(model, stages=[1, 2, 3], input_size=(3, 32, 32))
    assert wrapped.stages == own[1:4]
    assert [tuple(z.shape) for z in wrapped(torch.randn(2, 3, 32, 32))] == [(2, 5)] * 4


# -- weak before: now named at the call -----------------------------------------------------------


def test_wrap_names_what_it_cannot_take():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32)
    with pytest.raises(ValueError, match=r"^stage 'pos_embed' is a parameter or buffer of the model, not a feature it computes. "
                                         r"The model's stages are:"):
        timm_exits.wrap(vit, stages=["pos_embed"])
    backbone = timm.create_model("resnet18", num_classes=5)
    with pytest.raises(TypeError, match=exactly(
        "model is a DataParallel: wrap the model inside it (model.module), then apply DataParallel to the wrapped model"
    )):
        timm_exits.wrap(nn.DataParallel(backbone), stages=[1])
    with pytest.raises(TypeError, match=exactly(
        "model is compiled (torch.compile): wrap the plain model (model._orig_mod), then compile the wrapped model"
    )):
        timm_exits.wrap(torch.compile(backbone), stages=[1])
    with pytest.raises(TypeError, match=exactly("leaf_modules takes module classes, not instances: pass ReLU, not ReLU()")):
        timm_exits.wrap(backbone, stages=[1], leaf_modules=[nn.ReLU()])
    with pytest.raises(TypeError, match=r"^leaf_modules must be a list of module classes, e.g. leaf_modules=\[ReLU\]"):
        timm_exits.wrap(backbone, stages=[1], leaf_modules=nn.ReLU)


def test_list_stages_names_what_it_takes():
    with pytest.raises(TypeError, match=exactly(
        "list_stages takes a model (an nn.Module), got str; build it first, e.g. timm.create_model('resnet18')"
    )):
        timm_exits.list_stages("resnet18")
    with pytest.raises(TypeError, match=exactly(
        "list_stages takes the backbone: this model is already wrapped (stages ['layer1', 'layer2', 'layer3']); "
        "call list_stages(model.backbone)"
    )):
        timm_exits.list_stages(resnet())


def test_small_things_that_crashed():
    empty = timm_exits.EarlyExitResult(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert empty.exit_counts() == [] and empty.exit_counts(3) == [0, 0, 0]
    loss = timm_exits.MultiExitCELoss(weights=[1, 1, 1])
    with pytest.raises(ValueError, match=exactly("MultiExitCELoss: weights has 3 entries, one per exit, but outputs holds 4 exits")):
        loss([torch.randn(2, 5)] * 4, torch.zeros(2, dtype=torch.long))


def test_a_traced_shape_check_names_the_sizes_not_fx_proxies():
    vit = timm_exits.wrap(timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32), stages=[3]).eval()
    for call in (lambda: vit(torch.randn(2, 3, 64, 64)), lambda: timm_exits.early_exit(vit, torch.randn(2, 3, 64, 64), threshold=0.5)):
        with pytest.raises(AssertionError, match=exactly("Input height (64) doesn't match model (32).")):
            call()
    with pytest.raises(ValueError, match=r"\(from input_size\), where it runs on its own \(3, 32, 32\): "
                                         r"AssertionError: Input height \(64\) doesn't match model \(32\)\.;"):
        timm_exits.flops_report(vit, input_size=(3, 64, 64))
    assert vit(torch.randn(2, 3, 32, 32))[-1].shape == (2, 5)
    x = torch.randn(1, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(vit(x), pickle.loads(pickle.dumps(vit))(x)))


def test_unpickling_a_vit_leaves_later_wraps_traced():
    """Its segments' code once re-registered fx's None check under a dotted name: every later trace failed."""
    vit = timm_exits.wrap(timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32), stages=[3])
    pickle.loads(pickle.dumps(vit)), copy.deepcopy(vit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback to forward_intermediates warns
        assert resnet().steps()[0].skips


class Gated(nn.Module):
    """A block that runs its second conv only when the mean activation is positive: control flow on the data."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        if x.mean() > 0:
            x = self.b(x)
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.stage = Gated(), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.stage(self.gate(x)).mean((2, 3)))


def test_a_count_that_depends_on_the_input_says_so():
    torch.manual_seed(0)
    net = GatedNet()
    wrapped = timm_exits.wrap(net, stages=["gate"], leaf_modules=[Gated], input_size=(3, 16, 16))
    for model in (net, wrapped):
        notes = timm_exits.flops_report(model, input_size=(3, 16, 16)).notes
        branches = "the count depends on the example input: the model branches on tensor values (at "
        assert any(n.startswith(branches) and __file__ in n for n in notes), notes
    resnet_notes = timm_exits.flops_report(resnet()).notes
    vit = timm_exits.wrap(timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32), stages=[3])
    assert not any("tensor values" in n for n in resnet_notes + timm_exits.flops_report(vit).notes)  # shape checks are not branches


def test_a_feature_loss_with_a_head_that_gives_no_features():
    def no_features(channels, num_classes, layout):  # pools and classifies, but has no return_features
        return nn.Sequential(timm_exits.heads.FeaturePool(channels, layout), nn.Linear(channels, num_classes))

    model = resnet(head=no_features)
    with pytest.raises(TypeError, match=r"^the head of exit 1 \(Sequential\) takes no return_features: a feature term needs heads whose"):
        model(torch.randn(2, 3, 32, 32), return_features=True)


# -- checkpoints name the wrap they come from --------------------------------------------------------


def wrapped_at(stages):
    torch.manual_seed(0)
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=stages, input_size=(3, 32, 32))


def test_a_checkpoint_of_another_wrap_is_refused_by_name_even_when_the_shapes_agree():
    saved = wrapped_at(["layer1.0"]).state_dict()  # layer1.0 and layer1 both give 64 channels: the head shapes agree
    model = wrapped_at(["layer1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=exactly(
        "the checkpoint comes from a model wrapped at stages ['layer1.0'] with heads ['LinearHead']; "
        "this one is wrapped at stages ['layer1'] with heads ['LinearHead']: "
        "wrap the backbone as it was when saved (or load with strict=False to take what fits)"
    )):
        model.load_state_dict(saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    model.load_state_dict(saved, strict=False)  # on purpose: take what fits
    assert torch.equal(model.exits[0].fc.weight, saved["exits.0.fc.weight"])


def test_checkpoints_from_before_the_record_still_load_alone_and_nested():
    old = {k: v for k, v in wrapped_at([1, 2]).state_dict().items() if k != "exits._extra_state"}
    wrapped_at([1, 2]).load_state_dict(old)
    nn.Sequential(wrapped_at([1, 2])).load_state_dict({f"0.{k}": v for k, v in old.items()})
    other_wrap = {f"0.{k}": v for k, v in wrapped_at(["layer1.0"]).state_dict().items()}
    with pytest.raises(RuntimeError,
                       match=r"wrapped at stages \['layer1.0'\] with heads \['LinearHead'\]; this one is wrapped at stages \['layer1'\]"):
        nn.Sequential(wrapped_at(["layer1"])).load_state_dict(other_wrap)  # the record is checked inside a parent module too


def test_the_record_travels_in_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(wrapped_at(["layer1.0"]).state_dict(), tmp_path / "model.safetensors")
    wrapped_at(["layer1.0"]).load_state_dict(load_file(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match=r"^the checkpoint comes from a model wrapped at stages \['layer1.0'\]"):
        wrapped_at(["layer1"]).load_state_dict(load_file(tmp_path / "model.safetensors"))


def test_the_heads_still_behave_as_a_module_list():
    model = wrapped_at([1, 2, 3])
    tail = model.exits[1:]
    assert len(tail) == 2 and tail[0] is model.exits[1] and tail.stages == ["layer2", "layer3"]
    assert isinstance(model.exits, nn.ModuleList) and copy.deepcopy(model).exits.stages == ["layer1", "layer2", "layer3"]


def test_ekd_is_given_the_teachers_logits_not_the_teachers():
    loss = timm_exits.EnsembleKnowledgeDistillationLoss()
    teachers = nn.ModuleList([nn.Linear(4, 5)])
    logits = [torch.randn(2, 5) for _ in range(3)]
    message = ("teacher_logits takes the teachers' logits, not the teacher models: compute them first, "
               "e.g. with torch.no_grad(): teacher_logits = [teacher(x) for teacher in teachers]")
    for given in (teachers, list(teachers)):
        with pytest.raises(TypeError, match=exactly(message)):
            loss(logits, torch.zeros(2, dtype=torch.long), given)
    assert torch.isfinite(loss(logits, torch.zeros(2, dtype=torch.long), [torch.randn(2, 5)]))


def test_sizes_a_model_cannot_run_are_named_outside_wrap_too():
    """list_stages and flops_report ran the model on the size without a check: torch's or fx's message, and a traceback on the
    command line."""
    resnet = timm.create_model("resnet18", num_classes=5)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, depth=2)
    with pytest.raises(ValueError, match=r"^ResNet cannot run on a dummy input of input_size=\(1, 64, 64\): RuntimeError: Given groups=1"):
        timm_exits.list_stages(resnet, input_size=(1, 64, 64))
    with pytest.raises(ValueError, match=r"^VisionTransformer cannot run on a dummy input of input_size=\(3, 64, 64\): "
                                         r"AssertionError: Input height \(64\) doesn't match model \(32\)"):
        timm_exits.list_stages(vit, input_size=(3, 64, 64))
    with pytest.raises(ValueError, match=r"^MultiExitModel cannot run on an input of shape \(1, 3, 64, 64\) \(from input_size\), "
                                         r"where it runs on its own \(3, 32, 32\): AssertionError: Input height"):
        timm_exits.flops_report(timm_exits.wrap(vit, stages=[0]), input_size=(3, 64, 64))
    with pytest.raises(ValueError, match=r"^ResNet cannot run on an input of shape \(1, 1, 32, 32\) \(from example_input\), "
                                         r"where it runs on its own \(3, 224, 224\)"):
        timm_exits.flops_report(resnet, example_input=torch.randn(1, 1, 32, 32))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in resnet.modules())  # the failed count left no hook
    # nor a mode: both were built in training mode
    assert all(m.training for m in resnet.modules()) and all(m.training for m in vit.modules())
    with pytest.raises(ValueError, match=exactly("input_size must be three positive ints (channels, height, width), got 32")):
        timm_exits.wrap(resnet, stages=[1], input_size=32)
    with pytest.raises(ValueError, match=exactly("threshold must be a number, one number per early exit, or a Calibration; got '0.9'")):
        timm_exits.wrap(resnet, stages=[1], input_size=(3, 32, 32)).eval().early_exit(torch.randn(2, 3, 32, 32), threshold="0.9")


@pytest.mark.parametrize("args", [
    ["stages", "resnet18", "--input-size", "1", "64", "64"],
    ["flops", "vit_tiny_patch16_224", "--input-size", "3", "64", "64"],
])
def test_the_command_line_names_a_size_the_model_cannot_run(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "timm_exits", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "cannot run on" in done.stderr and "input_size" in done.stderr


# -- a misuse pass: calibration, compiling, plots, saved folders, numbers of other types -----------


def test_expected_calibration_error_refuses_what_it_cannot_score_and_leaves_unlabeled_samples_out():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 4), torch.randint(0, 4, (50,))
    message = "labels must be (50,) class indices, one per row of logits, got a (49,) tensor of torch.int64"
    with pytest.raises(ValueError, match=exactly(message)):
        timm_exits.expected_calibration_error(logits, labels[:49])  # broadcast, it returned 211.98
    message = "logits must be one exit's (N, C) tensor, got torch.Size([3, 50, 4]); for cached exits pass cached.logits[k]"
    with pytest.raises(ValueError, match=exactly(message)):
        timm_exits.expected_calibration_error(torch.stack([logits] * 3), labels)
    with pytest.raises(ValueError, match=exactly("bins must be an int >= 1 (Guo et al. use 15), got 0")):
        timm_exits.expected_calibration_error(logits, labels, bins=0)
    with pytest.raises(ValueError, match=exactly("expected_calibration_error needs labeled samples: every label is negative (unlabeled)")):
        timm_exits.expected_calibration_error(logits, torch.full((50,), -100))
    unlabeled = labels.clone()
    unlabeled[:20] = -100
    ece = timm_exits.expected_calibration_error(logits, unlabeled)
    assert ece == timm_exits.expected_calibration_error(logits[20:], labels[20:]) and 0 <= ece <= 1  # -100 means unlabeled, not wrong


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    """Guo et al.'s bin m holds ((m-1)/M, m/M]: two classes tied give confidence 0.5, the top of bin 1 of 2."""
    tied = torch.zeros(4, 2)  # confidence 0.5, predicted class 0, right: gap -0.5
    sure = torch.tensor([[10.0, -10.0]] * 4)  # confidence ~1, predicted class 0, wrong: gap +1
    logits, labels = torch.cat([tied, sure]), torch.tensor([0] * 4 + [1] * 4)
    # apart, the gaps add up: (4 * 0.5 + 4 * 1) / 8; in the upper bin with the sure rows they would cancel: |4 * -0.5 + 4 * 1| / 8
    assert timm_exits.expected_calibration_error(logits, labels, bins=2) == pytest.approx(0.75, abs=1e-6)


def test_compile_exits_a_second_time_with_other_settings_is_refused():
    model, _ = _resnet10t()
    timm_exits.compile_exits(model, backend="eager")
    assert timm_exits.compile_exits(model, backend="eager", dynamic=None) is model  # the same settings again (a default spelled out)
    for other in ({"backend": "aot_eager"}, {"backend": "no_such_backend"}, {}):
        with pytest.raises(ValueError, match=r"^this model's steps are already compiled with \{'backend': 'eager'\}; they cannot be"):
            timm_exits.compile_exits(model, **other)
    fresh = timm_exits.compile_exits(copy.deepcopy(model), backend="aot_eager")  # the way out the message names
    parts = [part for step in fresh.steps() for part in (step.segment, step.head) if part is not None]
    assert {part.compile_kwargs["backend"] for part in parts} == {"aot_eager"}


def _resnet10t():
    from conftest import resnet10t_exits

    return resnet10t_exits(4)


def test_plots_refuse_a_folder_as_the_file_to_write(tmp_path):
    pytest.importorskip("matplotlib")
    model, x = _resnet10t()
    cached = timm_exits.collect_exit_logits(model, [(x, torch.zeros(len(x), dtype=torch.long))])
    curve = timm_exits.budgeted_curve(cached, budgets=3)
    refused = f"path {str(tmp_path)!r} is a folder: give the file to write, e.g. "
    with pytest.raises(ValueError, match=exactly(refused + repr(str(tmp_path / "exits.png")))):
        timm_exits.plot_exits(model, tmp_path)
    with pytest.raises(ValueError, match=exactly(refused + repr(str(tmp_path / "tradeoff.png")))):
        timm_exits.plot_tradeoff(curve, str(tmp_path))
    with pytest.raises(ValueError, match=r"^path '.*not_yet/' is a folder"):
        timm_exits.plot_tradeoff(curve, f"{tmp_path}/not_yet/")  # would have been not_yet/.png
    assert not tmp_path.with_suffix(".png").exists() and not list(tmp_path.iterdir())  # nothing written beside it or inside
    timm_exits.plot_tradeoff(curve, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    buffer = io.BytesIO()  # a file object, as matplotlib takes
    timm_exits.plot_exits(model, buffer)
    assert buffer.getvalue().startswith(b"\x89PNG")


def test_from_pretrained_names_a_truncated_file(tmp_path):
    model, _ = _resnet10t()
    for name in ("model.safetensors", "config.json"):
        folder = model.save_pretrained(tmp_path / name, model_args={})  # no constructor argument beyond num_classes
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        pattern = (rf"^weights file '{re.escape(str(folder / name))}' could not be read as a checkpoint: " if name.endswith("safetensors")
                   else rf"^{re.escape(str(folder / name))} could not be read as JSON \(")
        with pytest.raises(ValueError, match=pattern):
            timm_exits.from_pretrained(folder)


def test_numbers_of_other_types_are_taken_where_python_numbers_are():
    np = pytest.importorskip("numpy")
    from conftest import overconfident

    cached = overconfident()
    expected = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05)
    for drop in (np.float32(0.05), torch.tensor(0.05), np.float64(0.05)):
        assert timm_exits.calibrate_thresholds(cached, max_accuracy_drop=drop).thresholds == pytest.approx(expected.thresholds)
    with pytest.raises(ValueError, match=exactly("max_accuracy_drop must be a fraction in [0, 1] (0.01 = one point), got '0.05'")):
        timm_exits.calibrate_thresholds(cached, max_accuracy_drop="0.05")
    temperatures = [2.0, 1.5, 1.0]
    by_list = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05, temperature=temperatures)
    others = (np.array(temperatures), torch.tensor(temperatures), [torch.tensor(t) for t in temperatures],
              [np.float32(t) for t in temperatures])
    for other in others:
        by_other = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05, temperature=other)
        assert by_other.thresholds == pytest.approx(by_list.thresholds)
    with pytest.raises(ValueError, match=exactly("temperature must be one positive number per exit (3), or calibrate_temperature's result; "
                                                 "got ndarray of shape (1, 3)")):
        timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05, temperature=np.array([temperatures]))
    guaranteed = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05, delta=0.1)
    assert timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05, delta=torch.tensor(0.1)).thresholds == guaranteed.thresholds
    budget = (cached.flops[0] + cached.flops[-1]) / 2
    by_float = timm_exits.calibrate_thresholds(cached, budget)
    assert timm_exits.calibrate_thresholds(cached, np.array(budget)).thresholds == by_float.thresholds
    with pytest.raises(ValueError, match=exactly("lr must be a learning rate > 0 (the ZTW code's is 5e-4), got '5e-4'")):
        timm_exits.fit_geometric_ensemble(cached, lr="5e-4")
    assert timm_exits.fit_geometric_ensemble(cached, epochs=1, lr=np.float32(5e-4), seed=np.int64(1)).num_exits == 3


def test_early_exit_stream_given_one_tensor_says_it_wants_batches():
    model, x = _resnet10t()
    message = ("batches must be an iterable of input batches (a DataLoader's images, a list of tensors), got one tensor of shape "
               "(4, 3, 32, 32): pass [x], or call model.early_exit(x)")
    with pytest.raises(TypeError, match=exactly(message)):
        timm_exits.early_exit_stream(model, x)
    assert timm_exits.early_exit_stream(model, [x]).exit_index.shape == (4,)
    assert timm_exits.early_exit_stream(model, torch.stack([x, x])).exit_index.shape == (8,)  # a stack of batches is an iterable of batches
