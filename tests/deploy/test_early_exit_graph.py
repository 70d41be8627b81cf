"""Early exit as one artifact: the ONNX file run by ONNX Runtime, and the torch.export program, against `early_exit`.

The reference is `early_exit` itself (tested in tests/runtime against definitions written out):
for every image, run alone as a deployed model runs it, the exit index must be equal and the
logits within float tolerance. The thresholds are calibrated to a FLOPs budget on the same kind of
images, so that samples leave at every exit.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import timm_exits
from tests.conftest import exactly, fallback_resnet, resnet10t_exits
from timm_exits.cli import main
from timm_exits.deploy.early_exit_graph import EarlyExitGraph

ONNX_TORCH = (2, 10)


def release(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in importlib.metadata.version(name).split("+")[0].split(".")[:2])


needs_onnx = pytest.mark.skipif(
    release("torch") < ONNX_TORCH,
    reason=f"torch.onnx writes torch.cond as an ONNX If from torch 2.10 on; this is torch {torch.__version__}",
)


def images(n: int, seed: int = 1) -> torch.Tensor:
    """Random images at spread scales, so that the exits' confidences spread too."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * torch.linspace(0.1, 3.0, n).view(-1, 1, 1, 1)


def budget_calibration(model, x, share=0.5, **kwargs):
    """Thresholds for half-way between the first exit's FLOPs and the backbone's, calibrated on `x` with made-up labels."""
    labels = torch.arange(x.shape[0]) % model.num_classes
    cached = timm_exits.collect_exit_logits(model, [(x, labels)], progress=False)
    budget = cached.flops[0] + share * (cached.flops[-1] - cached.flops[0])
    return timm_exits.calibrate_thresholds(cached, budget, **kwargs)


def onnx_session(path, profile_to=None):
    # onnxruntime is a test dependency (the dev extra): a missing one fails, never skips
    assert importlib.util.find_spec("onnxruntime"), "the ONNX tests need onnxruntime: pip install -e '.[dev]'"
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if profile_to is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_to)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def conv_batches(session) -> set[int]:
    """The batch sizes ONNX Runtime ran its convolutions at, read from its profile of the session's one run."""
    events = json.loads(Path(session.end_profiling()).read_text())
    return {e["args"]["input_type_shape"][0]["float"][0] for e in events
            if e.get("cat") == "Node" and e["args"].get("op_name") in ("Conv", "FusedConv")}


def assert_same_as_early_exit(run, model, x, threshold, **kwargs):
    """`run(one image) -> (logits, exit_index)` agrees with early_exit image by image; returns the exits taken."""
    want = timm_exits.early_exit(model, x, threshold, **kwargs)
    for i in range(x.shape[0]):
        logits, index = run(x[i:i + 1])
        assert int(index[0]) == int(want.exit_index[i]), f"image {i}"
        np.testing.assert_allclose(np.asarray(logits), want.logits[i:i + 1].numpy(), rtol=1e-4, atol=1e-4)
    return want.exit_counts(model.num_exits)


def convolutions_with_weights_elsewhere(graph) -> list[str]:
    """Conv nodes whose weight is not an initializer of their own graph (ONNX Runtime's NCHWc layout then skips them)."""
    own = {i.name for i in graph.initializer}
    found = [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] not in own]
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                found += convolutions_with_weights_elsewhere(a.g)
    return found


def if_nodes(graph) -> int:
    count = 0
    for node in graph.node:
        count += node.op_type == "If"
        count += sum(if_nodes(a.g) for a in node.attribute if a.HasField("g"))
    return count


@needs_onnx
def test_onnx_file_of_a_cnn_exits_where_early_exit_does(tmp_path):
    import onnx

    model, _ = resnet10t_exits(0)
    x = images(24)
    calibration = budget_calibration(model, images(48, seed=2))
    path = timm_exits.export_onnx(model, tmp_path / "resnet10t.onnx", example_input=x[:1], threshold=calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet10t.onnx"]  # one file, the weights inside
    program = onnx.load(str(path))
    assert [i.name for i in program.graph.input] == ["input"]
    assert [o.name for o in program.graph.output] == ["logits", "exit_index"]
    assert if_nodes(program.graph) == model.num_exits - 1  # one decision per early exit
    assert convolutions_with_weights_elsewhere(program.graph) == []

    session = onnx_session(path)
    counts = assert_same_as_early_exit(lambda xi: session.run(None, {"input": xi.numpy()}), model, x, calibration)
    assert all(c > 0 for c in counts), f"every exit taken by some image: {counts}"
    # a whole batch: each sample takes its own exit, and a later step computes only the samples still running
    profiled = onnx_session(path, profile_to=tmp_path / "profile")
    logits, index = profiled.run(None, {"input": x.numpy()})
    want = timm_exits.early_exit(model, x, calibration)
    assert index.tolist() == want.exit_index.tolist()
    np.testing.assert_allclose(logits, want.logits.numpy(), rtol=1e-4, atol=1e-4)
    assert conv_batches(profiled) == {24, 24 - counts[0], counts[2]}


def op_count(graph, op: str) -> int:
    count = 0
    for node in graph.node:
        count += node.op_type == op
        count += sum(op_count(a.g, op) for a in node.attribute if a.HasField("g"))
    return count


@needs_onnx
def test_a_file_for_one_image_at_a_time_leaves_the_row_bookkeeping_out(tmp_path):
    import onnx

    model, _ = resnet10t_exits(0)
    x = images(16)
    thresholds = budget_calibration(model, images(48, seed=2)).thresholds
    batch = timm_exits.export_onnx(model, tmp_path / "batch.onnx", example_input=x[:1], threshold=thresholds)
    one = timm_exits.export_onnx(model, tmp_path / "one.onnx", example_input=x[:1], threshold=thresholds, dynamic_batch=False)
    assert op_count(onnx.load(str(batch)).graph, "NonZero") == model.num_exits - 1
    program = onnx.load(str(one))
    assert op_count(program.graph, "NonZero") == 0 and if_nodes(program.graph) == model.num_exits - 1
    assert [d.dim_value for d in program.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    session = onnx_session(one)
    counts = assert_same_as_early_exit(lambda xi: session.run(None, {"input": xi.numpy()}), model, x, thresholds)
    assert sum(c > 0 for c in counts) >= 2, counts


@needs_onnx
def test_weights_too_large_for_one_protobuf_go_to_one_file_beside_it(tmp_path, monkeypatch):
    """Most weights sit inside the If branches (where ONNX Runtime optimises their convolutions), and still count."""
    from timm_exits.deploy import early_exit_graph

    model, _ = resnet10t_exits(0)
    weights = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(early_exit_graph, "EXTERNAL_WEIGHTS", weights // 2)  # the first step alone holds far less than half
    x = images(8)
    path = timm_exits.export_onnx(model, tmp_path / "m.onnx", example_input=x[:1], threshold=[0.2, 0.2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.stat().st_size < weights // 10 < (tmp_path / "m.onnx.data").stat().st_size
    session = onnx_session(path)
    assert_same_as_early_exit(lambda xi: session.run(None, {"input": xi.numpy()}), model, x, [0.2, 0.2])


@needs_onnx
def test_the_command_line_writes_a_vit_saved_folder_with_its_calibration(tmp_path):
    """The user's route: a save_pretrained folder and a saved calibration (entropy, the anytime ensemble, temperatures)."""
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, depth=6)
    model = timm_exits.wrap(backbone, stages=[2, 4], input_size=(3, 32, 32)).eval()
    calibration = budget_calibration(model, images(48, seed=2), criterion="entropy", ensemble=True, temperature=[0.5, 1.0, 2.0])
    folder = model.save_pretrained(tmp_path / "vit", model_name="vit_tiny_patch16_224",
                                   model_args={"num_classes": 5, "img_size": 32, "depth": 6})
    saved = calibration.save(tmp_path / "calibration.json")
    out = tmp_path / "vit.onnx"
    assert main(["export-onnx", str(folder), str(out), "--calibration", str(saved)]) == 0

    session = onnx_session(out)
    loaded = timm_exits.from_pretrained(folder)
    x = images(16)
    counts = assert_same_as_early_exit(
        lambda xi: session.run(None, {"input": xi.numpy()}), loaded, x, calibration, criterion="entropy", ensemble=True
    )
    assert counts[0] > 0 and counts[-1] > 0, counts


@needs_onnx
def test_the_command_line_builds_a_timm_model_and_loads_what_timms_checkpoint_saver_wrote(tmp_path, capsys):
    """The other route: a model name, its stages, and the checkpoint timm's train.py writes (its own CheckpointSaver)."""
    import argparse

    from timm.utils import CheckpointSaver

    model, _ = resnet10t_exits(0)
    with torch.no_grad():
        for p in model.parameters():  # trained weights, unlike a fresh model's
            p.add_(0.01 * torch.randn_like(p))
    args = argparse.Namespace(model="resnet10t", num_classes=5, input_size=[3, 32, 32])
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=1.0)
    thresholds = budget_calibration(model, images(48, seed=2)).thresholds
    out = tmp_path / "resnet10t.onnx"
    assert main(["export-onnx", "resnet10t", str(out), "--stages", "1", "2", "--num-classes", "5", "--input-size", "3", "32", "32",
                 "--checkpoint", str(tmp_path / "model_best.pth.tar"), "--threshold", *map(str, thresholds), "--one-image"]) == 0
    assert "runs it on 'input' (1, 3, 32, 32)" in capsys.readouterr().out
    session = onnx_session(out)
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]
    counts = assert_same_as_early_exit(lambda xi: session.run(None, {"input": xi.numpy()}), model, images(16), thresholds)
    assert sum(c > 0 for c in counts) >= 2, counts


def test_the_command_line_says_what_it_needs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export-onnx", "resnet10t", str(tmp_path / "m.onnx"), "--threshold", "0.9"])
    assert ("'resnet10t' is not a save_pretrained folder: to build it as a timm model name, give --stages (and --checkpoint "
            "with the weights your training wrote)") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export-onnx", str(tmp_path), str(tmp_path / "m.onnx"), "--threshold", "0.9", "--stages", "1"])
    assert "is a saved model folder: it records its stages and weights; leave out --stages and --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of --threshold or --calibration
        main(["export-onnx", str(tmp_path), str(tmp_path / "m.onnx")])
    assert "one of the arguments --threshold --calibration is required" in capsys.readouterr().err


def program_run(program):
    module = program.module()
    return lambda xi: [t.detach().numpy() for t in module(xi)]


# max_prob: the ONNX test of the CNN; patience, cascades and the geometric ensemble in the slow job (an export takes
# 15 s on torch 2.14, 45 s on torch 2.5 with two cores)
@pytest.mark.parametrize("criterion", ["margin", pytest.param("patience", marks=pytest.mark.slow)])
def test_torch_export_program_exits_where_early_exit_does(criterion):
    model, _ = resnet10t_exits(0)
    x = images(16)
    threshold = 1 if criterion == "patience" else budget_calibration(model, images(48, seed=2), criterion=criterion).thresholds
    program = timm_exits.export_early_exit(model, x[:2], threshold, criterion=criterion)
    counts = assert_same_as_early_exit(program_run(program), model, x, threshold, criterion=criterion)
    if criterion != "patience":  # a patience of 1 lets every image leave at exit 1
        assert sum(c > 0 for c in counts) >= 2, counts


@pytest.mark.slow
def test_cascaded_heads_and_the_geometric_ensemble_in_one_program():
    model, _ = resnet10t_exits(0, cascade=True)
    x = images(16)
    labels = torch.arange(48) % 5
    cached = timm_exits.collect_exit_logits(model, [(images(48, seed=2), labels)], progress=False)
    geometric = timm_exits.fit_geometric_ensemble(cached, epochs=5)
    threshold = [0.4, 0.4]
    program = timm_exits.export_early_exit(model, x[:1], threshold, ensemble=geometric)
    assert_same_as_early_exit(program_run(program), model, x, threshold, ensemble=geometric)


def test_threshold_inf_puts_no_decision_in_the_graph():
    model, _ = resnet10t_exits(0)
    graph = EarlyExitGraph.of(model, [float("inf"), 0.0])
    x = images(4)
    logits, index = graph(x)
    assert index.tolist() == [1, 1, 1, 1]  # the first exit is passed by nobody; the second by everyone
    torch.testing.assert_close(logits, model(x)[1])


def test_what_cannot_become_one_graph_is_refused():
    model = fallback_resnet()
    with pytest.raises(timm_exits.ExportError, match=r"computes every exit and leaving early would skip nothing(.|\n)*steps=False"):
        timm_exits.export_early_exit(model.eval(), torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match=exactly("model must be a MultiExitModel (from timm_exits.wrap), got ResNet")):
        timm_exits.export_early_exit(timm.create_model("resnet10t"), torch.randn(1, 3, 32, 32))
    model, _ = resnet10t_exits(0)
    with pytest.raises(ValueError, match=r"calibration was made for criterion='max_prob', not 'entropy'"):
        timm_exits.export_early_exit(model, torch.randn(1, 3, 32, 32), budget_calibration(model, images(16)), criterion="entropy")
    with pytest.raises(ValueError, match=exactly("path must name an .onnx file, got 'model.pt'")):
        timm_exits.export_onnx(model, "model.pt", torch.randn(1, 3, 32, 32))


def test_export_onnx_names_the_torch_it_needs(monkeypatch):
    model, _ = resnet10t_exits(0)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    needs = r"^export_onnx needs torch >= 2.10 (.*); this is torch 2.9.1\+cpu: upgrade torch, or use export_early_exit"
    with pytest.raises(RuntimeError, match=needs):
        timm_exits.export_onnx(model, "m.onnx", torch.randn(1, 3, 32, 32))


def test_export_onnx_names_the_extra_it_needs(monkeypatch):
    model, _ = resnet10t_exits(0)
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=exactly("export_onnx needs onnxscript: pip install 'timm-exits[deploy]'")):
        timm_exits.export_onnx(model, "m.onnx", torch.randn(1, 3, 32, 32))


def test_an_export_that_fails_leaves_the_model_as_it_was():
    model, _ = resnet10t_exits(0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(z):
        raise RuntimeError("the criterion failed")

    failed = r"could not capture early exit in one graph of ResNet: RuntimeError: the criterion failed"
    with pytest.raises(timm_exits.ExportError, match=failed):
        timm_exits.export_early_exit(model, torch.randn(1, 3, 32, 32), 0.5, criterion=boom)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
