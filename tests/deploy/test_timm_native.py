"""A multi-exit model behaves as a timm model does: reset_classifier, forward_features / forward_head, one exit scored as the output."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import timm_exits
from conftest import exactly
from timm_exits._checks import release


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
    one = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1], input_size=(3, 32, 32), eval_output=1)
    assert one.eval()(x).shape == (2, 10)


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
    with pytest.raises(ValueError, match=exactly(
        "num_classes must be an int >= 1 (a multi-exit model needs a classifier on every exit), got 0"
    )):
        model.reset_classifier(0)

    def plain_head(channels, num_classes, layout):
        return nn.Sequential(timm_exits.heads.FeaturePool(channels, layout), nn.Linear(channels, num_classes))

    custom = resnet(head=plain_head)
    with pytest.raises(TypeError, match=r"^the heads of exit 1 \(Sequential\), exit 2 \(Sequential\), exit 3 \(Sequential\) "
                                         r"have no reset_classifier"):
        custom.reset_classifier(5)
    assert custom.num_classes == 10 and custom.backbone.num_classes == 10  # refused before anything changed


def test_timms_reset_signature_and_torchvision_backbones_get_clear_answers():
    model = resnet()
    with pytest.raises(ValueError, match=exactly(
        "global_pool='max' would change the backbone's final features after wrap: build the backbone with global_pool='max', then wrap it"
    )):
        model.reset_classifier(5, global_pool="max")
    model.reset_classifier(5, global_pool=None)
    model.reset_classifier(5, global_pool="avg")  # the pool it has
    assert model.num_classes == 5
    vision = timm_exits.wrap(torchvision.models.resnet18(num_classes=10), stages=[1, 2], input_size=(3, 32, 32))
    for call in (vision.get_classifier, lambda: vision.forward_features(torch.randn(1, 3, 32, 32))):
        with pytest.raises(AttributeError,
                           match=r"^the backbone \(ResNet\) has no (get_classifier|forward_features)\(\): it is a timm model method"):
            call()


def test_the_saved_pretrained_cfg_describes_the_saved_weights(tmp_path):
    """As timm's save_config_for_hf: not where the original weights came from, and the classes the model now has."""
    import json

    model = timm_exits.create_model("resnet18", stages=[1], num_classes=10, input_size=(3, 32, 32))
    assert model.backbone.pretrained_cfg.get("hf_hub_id") and model.backbone.pretrained_cfg["num_classes"] == 1000
    cfg = json.loads((model.save_pretrained(tmp_path / "saved") / "config.json").read_text())["pretrained_cfg"]
    assert cfg["num_classes"] == 10 and not {"url", "hf_hub_id", "file", "source", "label_names", "tag"} & set(cfg)
    assert cfg["input_size"] == [3, 32, 32] and cfg["architecture"] == "resnet18" and "test_input_size" not in cfg
    assert cfg["mean"] == list(model.backbone.pretrained_cfg["mean"])  # three channels: the backbone's normalisation stays


def test_a_one_channel_model_trained_from_scratch_saves_a_pretrained_cfg_of_its_own_inputs(tmp_path):
    """As a user met it: 1x32x32 digits, from scratch; the saved config said 3x224x224, ImageNet's mean and the tag a1_in1k."""
    import json

    from timm.data import resolve_data_config

    model = timm_exits.create_model("resnet18", stages=[1, 2], num_classes=10, in_chans=1, input_size=(1, 32, 32))
    cfg = json.loads((model.save_pretrained(tmp_path / "plain") / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32] and not {"tag", "mean", "std", "pool_size", "test_input_size"} & set(cfg), cfg
    folder = model.save_pretrained(tmp_path / "own", data_config={"mean": (0.5,), "std": (0.25,), "interpolation": "bilinear"})
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert cfg["mean"] == [0.5] and cfg["std"] == [0.25] and cfg["interpolation"] == "bilinear"
    again = timm_exits.from_pretrained(folder)  # the rebuilt backbone carries the saved description, for timm's data pipeline
    data = resolve_data_config(model=again.backbone)
    assert data["input_size"] == (1, 32, 32) and tuple(data["mean"]) == (0.5,) and tuple(data["std"]) == (0.25,), data
    for bad, message in [({"mean": (0.5, 0.5, 0.5)}, r"data_config\['mean'\] must hold one number per input channel \(1\), got \(0.5, 0.5"),
                         ({"std": (0,)}, r"data_config\['std'\] must be positive"),
                         ({"norm": 1}, r"data_config must be a dict of timm's data keys \[.*\], got \['norm'\]")]:
        with pytest.raises(ValueError, match=message):
            model.save_pretrained(tmp_path / "bad", data_config=bad)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_data_config_is_saved_for_a_backbone_without_a_pretrained_cfg(tmp_path):
    """A torchvision backbone has no pretrained_cfg: the normalisation the user gives is written anyway, numpy numbers too."""
    import json

    import numpy as np
    import torchvision

    model = timm_exits.wrap(torchvision.models.resnet18(num_classes=10), stages=[1], input_size=(3, 32, 32))
    folder = model.save_pretrained(tmp_path / "tv", model_name="torchvision:resnet18",
                                   data_config={"mean": np.array([0.5, 0.4, 0.3]), "std": (0.2, 0.2, np.float32(0.25)), "crop_pct": 0.9})
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert cfg == {"num_classes": 10, "input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25], "crop_pct": 0.9}
    assert json.loads((model.save_pretrained(tmp_path / "none", model_name="torchvision:resnet18") / "config.json").read_text()).get(
        "pretrained_cfg") is None  # nothing to describe: nothing written
    for bad, message in [({"crop_pct": 2}, r"data_config\['crop_pct'\] must be a number in \(0, 1\], got 2"),
                         ({"interpolation": 3}, r"data_config\['interpolation'\] must be a name as timm writes it")]:
        with pytest.raises(ValueError, match=message):
            model.save_pretrained(tmp_path / "bad", model_name="torchvision:resnet18", data_config=bad)
    assert not (tmp_path / "bad").exists()


def test_forward_features_and_forward_head_are_the_backbones():
    model = resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert torch.equal(feats, model.backbone.forward_features(x))
    assert torch.equal(model.forward_head(feats), model(x)[-1])
    assert torch.equal(model.forward_head(feats, pre_logits=True), model.backbone.forward_head(feats, pre_logits=True))


# -- the command line --------------------------------------------------------------------------------


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    from timm_exits.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"timm-exits {timm_exits.__version__}\n"
    done = subprocess.run([sys.executable, "-m", "timm_exits", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == f"timm-exits {timm_exits.__version__}\n"


def test_stages_as_json_number_the_rows_as_wrap_takes_them(capsys):
    import json

    from timm_exits.cli import main

    assert main(["stages", "resnet18", "--num-classes", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["stages"]
    assert data["model"] == "resnet18" and [r["name"] for r in rows] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert [r["index"] for r in rows] == list(range(5)) and rows[-1]["final"] and all(r["usable"] for r in rows)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[rows[2]["index"]])
    assert model.stages == [rows[2]["name"]]


def test_flops_json_numbers_exits_as_the_table_does(capsys):
    import json

    from timm_exits.cli import main

    assert main(["flops", "resnet18", "--num-classes", "10", "--stages", "1", "2", "--input-size", "3", "32", "32", "--json"]) == 0
    exits = json.loads(capsys.readouterr().out)["exits"]
    assert main(["flops", "resnet18", "--num-classes", "10", "--stages", "1", "2", "--input-size", "3", "32", "32"]) == 0
    table = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:5]]
    assert [str(e["exit"]) for e in exits] == table == ["1", "2", "3"]


# -- saving and rebuilding ------------------------------------------------------------------------------


def test_create_model_equals_wrapping_by_hand():
    torch.manual_seed(0)
    made = timm_exits.create_model("resnet18", stages=[1, 2, 3], num_classes=10, input_size=(3, 32, 32))
    torch.manual_seed(0)
    by_hand = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1, 2, 3], input_size=(3, 32, 32))
    assert made.stages == by_hand.stages and made.state_dict().keys() == by_hand.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(made.state_dict().values(), by_hand.state_dict().values()))
    with pytest.raises(ValueError, match=r"^unknown timm model 'resnet1O'; did you mean"):
        timm_exits.create_model("resnet1O", stages=[1])


@pytest.mark.parametrize("name, stages, kwargs", [
    ("resnet18", [1, 2, 3], {"num_classes": 10, "in_chans": 1}),
    ("vit_tiny_patch16_224", [3, 6], {"num_classes": 5, "img_size": 32}),
    ("torchvision:resnet18", [1, 2], {"num_classes": 7}),
])
def test_save_pretrained_then_from_pretrained_gives_the_same_model(tmp_path, name, stages, kwargs):
    import json

    torch.manual_seed(0)
    model = timm_exits.create_model(name, stages=stages, head=["linear", "sdn", "linear"][: len(stages)], eval_output="final", **kwargs)
    model.train()
    x = torch.randn(2, kwargs.get("in_chans", 3), *([kwargs["img_size"]] * 2 if "img_size" in kwargs else [32, 32]))
    model(x)  # batch-norm statistics move: the saved state is not the initial one
    model.eval()
    folder = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == kwargs["num_classes"]
    assert config["timm_exits"]["stages"] == model.stages and config["timm_exits"]["version"] == timm_exits.__version__
    again = timm_exits.from_pretrained(folder)
    assert again.stages == model.stages and again.eval_output == "final" and not again.training
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        assert all(torch.equal(a, b) for a, b in zip(again.forward_exits(x), model.forward_exits(x)))


def test_a_model_wrapped_by_hand_saves_too_and_another_wrap_is_refused(tmp_path):
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10, in_chans=1), stages=[1, 2], input_size=(1, 32, 32))
    if release("timm") < (1, 0, 31):  # timm records constructor arguments from 1.0.31: before, they are given
        needs = r"^save_pretrained of a timm model wrapped by hand needs timm >= 1.0.31 \(timm records a model's constructor arguments"
        with pytest.raises(RuntimeError, match=needs + r" from then on\); this is timm [\d.]+: pass model_args= with those"):
            model.save_pretrained(tmp_path / "a")
        again = timm_exits.from_pretrained(model.save_pretrained(tmp_path / "a", model_args={"in_chans": 1}))
    else:
        again = timm_exits.from_pretrained(model.save_pretrained(tmp_path / "a"))
    assert again.backbone.conv1.in_channels == 1 and again.stages == ["layer1", "layer2"]
    tv = timm_exits.wrap(torchvision.models.resnet18(num_classes=10), stages=[1], input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"^save_pretrained cannot tell which model ResNet is .*pass model_name='torchvision:NAME'"):
        tv.save_pretrained(tmp_path / "tv")
    assert timm_exits.from_pretrained(tv.save_pretrained(tmp_path / "tv", model_name="torchvision:resnet18")).stages == ["layer1"]
    other = timm_exits.create_model("resnet18", stages=["layer1.0", "layer2"], num_classes=10, in_chans=1, input_size=(1, 32, 32))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match=r"the checkpoint comes from a model wrapped at stages \['layer1.0', 'layer2'\]"):
        timm_exits.create_model("resnet18", stages=[1, 2], num_classes=10, in_chans=1, input_size=(1, 32, 32),
                                checkpoint_path=tmp_path / "other.pth")


def test_a_head_that_cannot_be_imported_is_named_at_save(tmp_path):
    def local_head(channels, num_classes, layout):
        return timm_exits.heads.LinearHead(channels, num_classes, layout)

    model = timm_exits.create_model("resnet18", stages=[1], head=local_head, num_classes=10, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"^the head of exit 1 "
                                          r"'test_timm_native:test_a_head_that_cannot_be_imported_is_named_at_save.<locals>.local_head' "
                                          r"cannot be imported"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_backbone_writes_what_timm_loads(tmp_path, capsys):
    import argparse
    import fractions

    from timm.utils import CheckpointSaver, ModelEmaV3

    from timm_exits.cli import main

    torch.manual_seed(0)
    model = timm_exits.create_model("resnet18", stages=[1, 2, 3], num_classes=10, input_size=(3, 32, 32)).eval()
    ema = ModelEmaV3(model)
    with torch.no_grad():
        for p in ema.module.parameters():  # other weights, to tell them apart
            p.add_(1)
    # the checkpoint timm's train.py writes: its own saver, with the run's arguments pickled beside the weights
    args = argparse.Namespace(model="resnet18", num_classes=10, lr=0.1, input_size=[3, 32, 32], mean=None, epochs=3)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args, model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=2, metric=50.0)
    best = tmp_path / "model_best.pth.tar"
    assert main(["export-backbone", str(best), str(tmp_path / "backbone.safetensors")]) == 0
    out = capsys.readouterr().out  # the hint names the architecture the checkpoint records
    assert "from its 'state_dict' of" in out and "timm.create_model('resnet18', checkpoint_path=" in out, out
    plain = timm.create_model("resnet18", num_classes=10, checkpoint_path=str(tmp_path / "backbone.safetensors")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x)[-1])
    assert main(["export-backbone", str(best), str(tmp_path / "ema.pth"), "--use-ema"]) == 0
    assert "from its 'state_dict_ema' of" in capsys.readouterr().out
    assert torch.equal(torch.load(tmp_path / "ema.pth")["conv1.weight"], ema.module.backbone.conv1.weight)
    again = timm_exits.create_model("resnet18", stages=[1, 2, 3], num_classes=10, input_size=(3, 32, 32), checkpoint_path=best)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ema.module.state_dict().values()))  # EMA, as timm's
    folder = model.save_pretrained(tmp_path / "saved")
    path, where = timm_exits.export_backbone(folder, tmp_path / "from_folder.pth")
    assert where == "the file" and torch.equal(torch.load(path)["fc.weight"], model.backbone.fc.weight)
    assert main(["export-backbone", str(folder), str(tmp_path / "folder_ema.pth"), "--use-ema"]) == 0
    out = capsys.readouterr().out  # asked for EMA weights where there are none: said, and the folder names its backbone
    assert "(from the file (it holds no EMA weights) of" in out and "timm.create_model('resnet18', checkpoint_path=" in out
    # a folder as a checkpoint
    again = timm_exits.create_model("resnet18", stages=[1, 2, 3], num_classes=10, input_size=(3, 32, 32), checkpoint_path=folder)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    torch.save(model.backbone.state_dict(), tmp_path / "plain.pth")
    torch.save({"state_dict": model.state_dict(), "args": fractions.Fraction(1, 3)}, tmp_path / "foreign.pth")  # a trainer's own class
    for argv, message in [
        ([str(tmp_path / "missing.pth"), str(tmp_path / "out.pth")], f"checkpoint '{tmp_path / 'missing.pth'}' is not a file"),
        ([str(tmp_path / "broken.pth"), str(tmp_path / "out.pth")],
         f"checkpoint '{tmp_path / 'broken.pth'}' could not be read as a checkpoint: "),
        ([str(tmp_path / "plain.pth"), str(tmp_path / "out.pth")], f"'{tmp_path / 'plain.pth'}' has no 'backbone.*' keys"),
        ([str(tmp_path / "foreign.pth"), str(tmp_path / "out.pth")],
         f"checkpoint '{tmp_path / 'foreign.pth'}' holds a pickled fractions.Fraction, which loading with weights_only=True does not"),
        ([str(best), str(tmp_path)], f"out '{tmp_path}' is a folder"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["export-backbone", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"timm-exits export-backbone: error: {message}") and err.count("\n") == 1, err


def test_a_reset_model_saves_and_loads_with_its_new_classes_and_everything_it_was_wrapped_with(tmp_path):
    torch.manual_seed(0)
    model = timm_exits.create_model("resnet18", stages=[-4, "layer2"], head=["sdn", "conv"],
                                    num_classes=10, input_size=(3, 32, 32), eval_output=1,
                                    **({"dtype": torch.float32} if release("timm") >= (1, 0, 21) else {}))  # dtype from timm 1.0.21
    model.reset_classifier(4)
    again = timm_exits.from_pretrained(model.save_pretrained(tmp_path / "reset"))
    x = torch.randn(2, 3, 32, 32)
    assert again.num_classes == 4 and again.eval_output == 1 and again.stages == model.stages == ["layer1", "layer2"]
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x)) and again(x).shape == (2, 4)
    sdn = timm_exits.create_model("resnet18", stages=[1, 2], head="sdn", head_kwargs={"grid": 2}, num_classes=10, input_size=(3, 32, 32))
    assert timm_exits.from_pretrained(sdn.save_pretrained(tmp_path / "sdn")).exits[0].grid == 2


def test_callables_no_name_imports_are_refused_at_save(tmp_path):
    import functools

    head = functools.partial(timm_exits.heads.LinearHead)
    model = timm_exits.create_model("resnet18", stages=[1], head=head, num_classes=10, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"^the head of exit 1 '<a partial instance>' cannot be imported"):
        model.save_pretrained(tmp_path / "x")


def test_timms_validate_route_scores_exit_k_from_a_training_checkpoint(tmp_path):
    """docs/timm_scripts.md: validate.py wraps with eval_output=k before timm's load_checkpoint, then scores exit k alone."""
    from timm.models import load_checkpoint

    torch.manual_seed(0)
    trained = timm_exits.create_model("resnet18", stages=[1, 2, 3], num_classes=10, input_size=(3, 32, 32))
    task = timm_exits.MultiExitTask(trained, "eed", criterion_kwargs={"base_loss": nn.CrossEntropyLoss(label_smoothing=0.1)}, verbose=False)
    torch.save({"epoch": 0, **task.get_checkpoint_state()}, tmp_path / "model_best.pth.tar")
    x = torch.randn(2, 3, 32, 32)
    for k in range(4):
        model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1, 2, 3], input_size=(3, 32, 32), eval_output=k)
        load_checkpoint(model, str(tmp_path / "model_best.pth.tar"), use_ema=True)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), trained.eval()(x)[k])
    other = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=["layer1.0", "layer2", "layer3"], input_size=(3, 32, 32))
    with pytest.raises(RuntimeError, match=r"the checkpoint comes from a model wrapped at stages \['layer1', 'layer2', 'layer3'\]"):
        load_checkpoint(other, str(tmp_path / "model_best.pth.tar"))


# -- pictures --------------------------------------------------------------------------------------------


def test_plot_exits_draws_the_segments_the_carried_values_and_the_heads(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    from timm_exits.plots import describe_exits

    backend = matplotlib.get_backend()
    model = resnet()
    steps = describe_exits(model)
    report = timm_exits.flops_report(model).exits
    assert [s.stage for s in steps] == ["layer1", "layer2", "layer3", "final"]
    assert [s.feature for s in steps[:3]] == [(64, 8, 8), (128, 4, 4), (256, 2, 2)] and steps[-1].feature == (10,)
    assert [s.carried for s in steps] == [[(64, 8, 8)], [(128, 4, 4)], [(256, 2, 2)], []]
    assert (sum(s.segment_flops for s in steps) == report[-1].backbone_flops
            and [s.head_flops for s in steps] == [e.head_flops for e in report])
    fig = timm_exits.plot_exits(model, tmp_path / "resnet18.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert type(fig).__name__ == "Figure" and matplotlib.get_backend() == backend
    assert [t.split("\n")[1] for t in texts if t.startswith("segment ")] == ["→ layer1", "→ layer2", "→ layer3", "→ output"]
    assert "64×8×8" in texts and "128×4×4" in texts and "3×32×32" in texts  # the carried values, and the input
    assert [t for t in texts if t.endswith("logits")] == [f"exit {k} logits" for k in range(1, 5)]
    assert (tmp_path / "resnet18.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(TypeError, match=exactly("model must be a MultiExitModel (timm_exits.wrap(...)), got ResNet")):
        timm_exits.plot_exits(model.backbone)


def test_a_one_channel_timm_model_is_traced_at_its_own_channels_without_input_size():
    """timm before 1.0.25 keeps no in_chans on a ResNet and its pretrained_cfg says 3x224x224: the first conv it names says 1."""
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=5, in_chans=1), stages=[1])
    assert tuple(model.input_size) == (1, 224, 224)
    assert [tuple(z.shape) for z in model(torch.randn(2, 1, 64, 64))] == [(2, 5), (2, 5)]
