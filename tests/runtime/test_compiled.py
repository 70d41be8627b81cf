"""Compiled early exit: one graph per part after warm-up for every batch size from 1 to 64, and the same answers as eager.

Graphs are counted with dynamo's CompileCounter backend (it runs what dynamo captured, eagerly): a
count, not a timing, so it holds on any machine.
"""
import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounter

import timm_exits
from conftest import exactly, fallback_resnet, resnet10t_exits


def model_and_thresholds(cascade=False):
    model, x = resnet10t_exits(64, cascade)
    with torch.no_grad():
        every = model.forward_exits(x)
    thresholds = [float(z.softmax(-1).amax(-1).median()) for z in every[:-1]]  # about half leave at each exit
    return model, x, thresholds


@pytest.mark.parametrize("cascade", [False, True])
def test_no_part_recompiles_after_warm_up_for_any_batch_size_from_1_to_64(cascade):
    model, x, thresholds = model_and_thresholds(cascade)
    eager = [model.early_exit(x[:b], threshold=thresholds) for b in range(1, 65)]
    flops = [e.flops for e in timm_exits.flops_report(model, input_size=(3, 32, 32)).exits]
    torch._dynamo.reset()
    counter = CompileCounter()
    assert timm_exits.compile_exits(model, backend=counter) is model
    assert [e.flops for e in timm_exits.flops_report(model, input_size=(3, 32, 32)).exits] == flops  # counted on the plain parts
    with torch.no_grad():
        for b in (1, 2, 64):  # warm-up: every part at a batch of 1 (always specialised) and at larger ones
            model.forward_exits(x[:b])
    warm = counter.frame_count
    parts = 2 * model.num_exits - 1  # segments and heads
    assert 0 < warm <= 3 * parts  # a batch of 1, of 2 to 15 and of 16 or more: CPU convolution chooses its path by batch size
    sizes = set()
    for b in range(1, 65):
        result = model.early_exit(x[:b], threshold=thresholds)
        torch.testing.assert_close(result.logits, eager[b - 1].logits)
        assert torch.equal(result.exit_index, eager[b - 1].exit_index)
        sizes.update(int(n) for n in torch.bincount(result.exit_index, minlength=3).flip(0).cumsum(0))  # batch sizes the later parts saw
    assert counter.frame_count == warm, f"{counter.frame_count - warm} recompilations after warm-up"
    assert len(sizes) > 30  # the later segments really ran at many sizes


def test_bad_models_are_named():
    with pytest.raises(TypeError, match=exactly("model must be a MultiExitModel (timm_exits.wrap(...)), got ResNet")):
        timm_exits.compile_exits(timm.create_model("resnet10t"))
    with pytest.raises(ValueError, match=r"^this model runs through forward_intermediates"):
        timm_exits.compile_exits(fallback_resnet())


def test_gradient_checkpointing_still_checkpoints_compiled_segments(monkeypatch):
    import timm_exits.model.steps as model_module

    model, x, _ = model_and_thresholds()
    timm_exits.compile_exits(model, backend=CompileCounter())
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    model.train()
    model.set_grad_checkpointing(True)
    sum(z.sum() for z in model(x[:4])).backward()
    assert len(calls) == model.num_exits  # every segment, the uncompiled graph each time


def test_a_failed_compile_leaves_every_step_as_it_was():
    model, _, _ = model_and_thresholds()
    before = [(step.segment, step.head) for step in model.steps(training=False)]
    with pytest.raises(Exception, match="no-such-backend"):
        timm_exits.compile_exits(model, backend="no-such-backend")
    assert [(step.segment, step.head) for step in model.steps(training=False)] == before
