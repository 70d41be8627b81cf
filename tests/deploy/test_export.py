"""torch.export of the all-exits model and of each exit step: outputs equal eager's."""
import importlib.util

import pytest
import timm
import torch

import timm_exits
from conftest import DataDependent
from timm_exits._checks import release

CASES = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=5), [1, 2, 3]),
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32), ["blocks.3", "blocks.7"]),
}


@pytest.mark.parametrize("name", CASES)
def test_exported_programs_equal_eager(name):
    torch.manual_seed(0)
    build, stages = CASES[name]
    model = timm_exits.wrap(build(), stages=stages).train()
    exported = timm_exits.export_exits(model, torch.randn(3, 3, 32, 32))
    assert model.training, "export leaves the model in the mode it found it"
    assert len(exported.steps) == model.num_exits and exported.stages == model.stages
    model.eval()
    x = torch.randn(5, 3, 32, 32)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        eager = model(x)
        whole = exported.program.module()(x)
        steps = exported.run_steps(x)
    for k, (e, w, s) in enumerate(zip(eager, whole, steps, strict=True)):
        torch.testing.assert_close(w, e, rtol=1e-5, atol=1e-5, msg=f"all-exits program, exit {k}")
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-5, msg=f"step program, exit {k}")
    # a step program holds its own part of the weights, not the whole backbone's (torch 2.5 also lists the
    # heads' recorded wrap, a module's extra state, among the all-exits program's; later releases do not)
    def weights(program):
        return [key for key in program.state_dict if not key.endswith("_extra_state")]

    per_step = [len(weights(p)) for p in exported.steps]
    assert sum(per_step) == len(weights(exported.program)), per_step


def test_step_batch_can_shrink_between_steps():
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2]).eval()
    exported = timm_exits.export_exits(model, torch.randn(4, 3, 32, 32), whole=False)
    x = torch.randn(6, 3, 32, 32)
    _, *carried = exported.steps[0].module()(x)
    keep = torch.tensor([0, 3, 5])  # what an early-exit runtime does: only the unconfident go on
    z1, *carried = exported.steps[1].module()(*[c[keep] for c in carried])
    with torch.no_grad():
        torch.testing.assert_close(z1, model(x[keep])[1], rtol=1e-5, atol=1e-5)


def test_static_export_and_bad_input():
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1])
    x = torch.randn(1, 3, 32, 32)
    exported = timm_exits.export_exits(model, x, dynamic_batch=False, steps=False)
    assert exported.steps == [] and model.training
    model.eval()
    with torch.no_grad():
        for got, want in zip(exported.program.module()(x), model(x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # specialised to the batch of 1 (each torch release words it its own way)
    with pytest.raises((AssertionError, RuntimeError), match=r"Guard failed|size|shape\[0\] to be equal to 1"):
        exported.program.module()(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no steps"):
        exported.run_steps(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="batch of at least 2"):
        timm_exits.export_exits(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="MultiExitModel"):
        timm_exits.export_exits(model.backbone, torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="example_input"):
        timm_exits.export_exits(model, [1, 2])


def _fallback_model():
    backbone = timm.create_model("resnet18", num_classes=5)
    backbone.layer2[0].act1 = DataDependent()
    with pytest.warns(UserWarning, match="forward_intermediates"):
        return timm_exits.wrap(backbone, stages=[1, 2])


def test_data_dependent_control_flow_is_a_clear_error():
    model = _fallback_model()
    with pytest.raises(timm_exits.ExportError, match=r"could not be traced by torch.fx(.|\n)*steps=False"):
        timm_exits.export_exits(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(timm_exits.ExportError, match=r"the all-exits model of ResNet(.|\n)*data-dependent control flow(.|\n)*torch.cond"):
        timm_exits.export_exits(model, torch.randn(2, 3, 32, 32), steps=False)


def test_onnx_export_of_the_all_exits_program(tmp_path):
    if release("torch") < (2, 10):  # 2.5-2.9 fail inside onnxscript 0.6's passes (batch norm on 2.5-2.6, a version conversion on 2.8-2.9)
        pytest.skip(f"torch.onnx.export(dynamo=True) with onnxscript >= 0.6 needs torch >= 2.10; this is torch {torch.__version__}")
    # onnx and onnxscript are test dependencies (the dev extra), not the library's: a missing one fails, never skips
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    assert not missing, f"ONNX export needs {missing}: install the test dependencies, pip install -e '.[dev]'"
    import onnx
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2]).eval()
    exported = timm_exits.export_exits(model, torch.randn(2, 3, 32, 32), steps=False)
    path = tmp_path / "exits.onnx"
    torch.onnx.export(exported.program, f=str(path), dynamo=True)
    program = onnx.load(str(path))

    x = torch.randn(3, 3, 32, 32)  # another batch size than the example's: the batch dimension stays dynamic in ONNX
    outs = ReferenceEvaluator(program).run(None, {program.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        for got, want in zip(outs, model(x), strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
