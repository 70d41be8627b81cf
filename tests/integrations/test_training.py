"""MultiExitTask and training integrations: compile, bf16, channels_last, checkpointing, resume, EMA, FSDP2."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_exits
from timm_exits._checks import release

ROOT = Path(__file__).resolve().parents[2]


def small_model(stages=(1, 2, 3), name="resnet10t", **kwargs):
    torch.manual_seed(0)
    return timm_exits.wrap(timm.create_model(name, num_classes=10), stages=list(stages), **kwargs)


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_task_returns_loss_output_and_per_exit_components():
    task = timm_exits.MultiExitTask(small_model(), "distillation", verbose=False)
    x, y = batch()
    result = task(x, y)
    assert result["output"].shape == (4, 10) and result["exit_logits"].shape == (4, 4, 10)
    assert {f"ce/exit{i}" for i in range(1, 5)} | {"distill/exit1", "temperature", "teacher_maxprob"} <= set(result)
    result["loss"].backward()
    # every exit head and the backbone get a gradient: DDP needs no find_unused_parameters
    assert all(p.grad is not None for p in task.trainable_module.parameters())
    # the final exit is the backbone's own output
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(task(x, y)["output"], task.model.backbone(x))


def test_task_is_a_timm_training_task_and_works_with_timm_resume(tmp_path):
    timm_task = pytest.importorskip("timm.task", reason=f"timm's TrainingTask came in timm 1.0.23; this is timm {timm.__version__}")
    task = timm_exits.MultiExitTask(small_model(), "distillation", verbose=False)
    assert isinstance(task, timm_task.TrainingTask)
    task.criterion.temperature.fill_(2.5)
    torch.save({"epoch": 3, **task.get_checkpoint_state()}, tmp_path / "ckpt.pth")
    fresh = timm_exits.MultiExitTask(small_model(), "distillation", verbose=False)
    assert timm_task.resume_task_checkpoint(fresh, str(tmp_path / "ckpt.pth"), log_info=False) == 3
    assert float(fresh.criterion.temperature) == 2.5


def test_mate_parameters_live_in_the_trainable_module():
    task = timm_exits.MultiExitTask(small_model(), "mate", verbose=False)
    names = [n for n, _ in task.trainable_module.named_parameters()]
    assert "criterion.theta" in names  # so DDP all-reduces it and EMA averages it
    assert len(list(task.parameters())) == len(names)


def test_bad_task_input():
    model = small_model()
    with pytest.raises(ValueError, match=r"num_exits=3 but the model has 4 exits"):
        timm_exits.MultiExitTask(model, timm_exits.AppropriateTeachersLoss(num_exits=3), verbose=False)
    with pytest.raises(TypeError, match="wrap the backbone first"):
        timm_exits.MultiExitTask(model.backbone, "eed", verbose=False)
    with pytest.raises(TypeError, match="MultiExitLoss"):
        timm_exits.MultiExitTask(model, torch.nn.CrossEntropyLoss(), verbose=False)
    with pytest.raises(ValueError, match="unknown loss"):
        timm_exits.MultiExitTask(model, "nope", verbose=False)
    with pytest.raises(ValueError, match="needs teachers"):
        timm_exits.MultiExitTask(model, "ekd", verbose=False)
    with pytest.raises(ValueError, match="only used by the ensemble-KD loss"):
        timm_exits.MultiExitTask(model, "eed", teachers=[timm.create_model("resnet10t", num_classes=10)], verbose=False)
    with pytest.raises(ValueError, match=r"teachers\[0\] \(ResNet\) outputs 7 classes but the model has 10"):
        timm_exits.MultiExitTask(model, "ekd", teachers=[timm.create_model("resnet10t", num_classes=7)], verbose=False)
    with pytest.raises(ValueError, match="2 teachers for 4 exits"):
        timm_exits.MultiExitTask(model, "ekd", teachers=[timm.create_model("resnet10t", num_classes=10)] * 2, verbose=False)
    # a teacher without num_classes is checked on its output
    odd = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 7))
    task = timm_exits.MultiExitTask(model, "ekd", teachers=odd, verbose=False)
    with pytest.raises(ValueError, match=r"teachers\[0\] returned \(4, 7\)"):
        task(*batch())


def test_clip_parameters_are_the_models_and_the_losss():
    task = timm_exits.MultiExitTask(small_model(), "mate", verbose=False)
    ids = lambda params: [id(p) for p in params]  # noqa: E731
    model, theta = task.model, task.criterion.theta
    assert ids(task.get_clip_parameters()) == ids(model.parameters()) + [id(theta)]
    # exclude_head (timm's adaptive clipping) leaves out the backbone's classifier, and only it
    classifier = set(ids(model.backbone.get_classifier().parameters()))
    without = task.get_clip_parameters(exclude_head=True)
    assert set(ids(without)) == set(ids(model.parameters())) - classifier | {id(theta)} and classifier
    assert set(ids(model.exits.parameters())) <= set(ids(without))


def test_no_weight_decay_reaches_timms_optimizer_factory_through_the_task():
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    task = timm_exits.MultiExitTask(timm_exits.wrap(backbone, stages=[3, 6]), "eed", verbose=False)
    trainable = task.get_trainable_module()
    assert trainable.no_weight_decay() == {f"model.backbone.{n}" for n in backbone.no_weight_decay()}
    optimizer = create_optimizer_v2(trainable, "adamw", lr=1e-3, weight_decay=0.05)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay[id(backbone.cls_token)] == 0.0 and decay[id(backbone.pos_embed)] == 0.0  # 3-d tensors: only the list says so
    assert decay[id(backbone.blocks[0].attn.qkv.weight)] == 0.05 and decay[id(task.model.exits[0].fc.weight)] == 0.05
    assert len(decay) == len(list(trainable.parameters()))


def test_no_sync_skips_the_gradient_all_reduce_only_inside(tmp_path):
    import torch.distributed as dist

    task = timm_exits.MultiExitTask(small_model(), "eed", verbose=False)
    x, y = batch()
    with task.no_sync():  # not distributed: a no-op, gradients accumulate as usual
        task(x, y)["loss"].backward()
    assert all(p.grad is not None for p in task.parameters())
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        task.prepare_distributed()
        ddp = task.trainable_module
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and task.model is ddp.module.model
        with task.no_sync():
            assert ddp.require_backward_grad_sync is False
            task(x, y)["loss"].backward()
        assert ddp.require_backward_grad_sync is True
    finally:
        dist.destroy_process_group()


def test_ekd_teachers_stay_frozen_and_in_eval():
    teacher = timm.create_model("resnet10t", num_classes=10)
    task = timm_exits.MultiExitTask(small_model(), "ekd", teachers=[teacher], verbose=False)
    task.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    result = task(*batch())
    result["loss"].backward()
    assert "ensemble_ce" in result and all(p.grad is None for p in teacher.parameters())


def test_compiled_training_step_equals_eager():
    x, y = batch()
    eager = timm_exits.MultiExitTask(small_model(), "eed", verbose=False)
    compiled = copy.deepcopy(eager)
    eval_model = compiled.compile(backend="aot_eager")  # CPU-friendly: no C++ code generation
    for task in (eager, compiled):
        task(x, y)["loss"].backward()
    torch.testing.assert_close(compiled(x, y)["loss"], eager(x, y)["loss"])
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.get_eval_model() is eval_model and isinstance(compiled.model, timm_exits.MultiExitModel)


ONE_GRAPH = {  # every loss, with what reads state: the SDN ramp and MSD's hint weight (the epoch), the adaptive temperature
    "ce": {}, "sdn": dict(epochs=4), "distillation": {}, "eed": dict(feature_weight=1.0), "byot": dict(feature_weight=0.03),
    "msd": dict(epochs=4, feature_weight=0.5), "mate": {}, "ekd": {},
}


@pytest.mark.parametrize("name", list(ONE_GRAPH))
def test_a_compiled_loss_is_one_graph(name):
    """No loss reads a tensor into Python: compiled it is one graph, and on a GPU a step does not wait for the device.
    The target's range check is skipped under compile (torch checks the range itself); schedules and the adaptive
    temperature are computed from their buffers. Equal to eager, the state updates included."""
    assert sorted(ONE_GRAPH) == sorted(timm_exits.loss_names())
    torch.manual_seed(0)
    logits = [torch.randn(8, 10) for _ in range(3)] + [5 * torch.randn(8, 10)]  # a sure teacher: the adaptive temperature grows
    outputs = timm_exits.ExitOutputs(logits, [torch.randn(8, 6) for _ in range(4)])
    extra = ([torch.randn(8, 10)],) if name == "ekd" else ()
    for target in (torch.randint(0, 10, (8,)), torch.randn(8, 10).softmax(-1)):  # class indices, and mixup's soft targets
        eager = timm_exits.create_loss(name, num_exits=4, **ONE_GRAPH[name]).train()
        eager.set_epoch(1)
        compiled = copy.deepcopy(eager)
        torch._dynamo.reset()
        assert torch._dynamo.explain(copy.deepcopy(eager))(outputs, target, *extra).graph_break_count == 0
        run = torch.compile(compiled, backend="eager", fullgraph=True)
        for step in range(2):  # the adaptive temperature grows on the first call and is read by the second
            with timm_exits.host_syncs() as syncs:  # (dynamo does not trace under a dispatch mode: eager alone is counted)
                expected = eager(outputs, target, *extra)
            torch.testing.assert_close(run(outputs, target, *extra), expected)
            assert dict(syncs.counts) == {"_local_scalar_dense": 1}, syncs.counts  # eager's target check; nothing built from host data
            if name == "distillation":
                assert eager.temperature.item() == pytest.approx(1.05 ** (step + 1))
        torch.testing.assert_close(dict(compiled.named_buffers()), dict(eager.named_buffers()))
    with pytest.raises(ValueError, match=r"^target holds class 10, outside \[0, 10\)"):
        eager(outputs, torch.full((8,), 10), *extra)  # eager still names a bad class


def test_bf16_autocast_and_channels_last():
    task = timm_exits.MultiExitTask(small_model(), "eed", verbose=False)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = task(x, y)
    assert result["exit_logits"].dtype == torch.bfloat16 and result["loss"].dtype == torch.float32
    assert torch.isfinite(result["loss"])
    result["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in task.parameters())

    model = small_model().eval()
    with torch.no_grad():
        reference = model(x)
        model.to(memory_format=torch.channels_last)
        for a, b in zip(model(x.to(memory_format=torch.channels_last)), reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def saved_for_backward(fn) -> tuple[int, int]:
    """Run `fn` and count the tensors autograd keeps for the backward pass: how many, and their bytes."""
    count, size = 0, 0

    def pack(t):
        nonlocal count, size
        count, size = count + 1, size + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count, size


def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_gradients():
    x, y = batch()
    grads, saved = [], []
    for enable in (False, True):
        task = timm_exits.MultiExitTask(small_model(), "eed", verbose=False)
        task.model.set_grad_checkpointing(enable)
        result = {}
        saved.append(saved_for_backward(lambda: result.update(task(x, y))))  # noqa: B023 - called at once, in this iteration
        result["loss"].backward()
        grads.append([p.grad for p in task.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (plain_count, plain_bytes), (checked_count, checked_bytes) = saved
    # with checkpointing only the heads and the loss keep tensors: the segments recompute theirs in backward
    assert checked_count < plain_count / 3 and checked_bytes < plain_bytes / 3, saved


def _train(task, optimizer, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        task.set_epoch(step // 2)
        result = task(*batch(seed=step))
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        task.update_ema(step)
        losses.append(result["loss"].item())
    return losses


@pytest.mark.parametrize("loss", ["distillation", "mate", "msd"])
def test_resume_continues_exactly(loss, tmp_path):
    kwargs = {"epochs": 3, "feature_weight": 0.1} if loss == "msd" else {"maxprob": 0.0} if loss == "distillation" else {}
    make = lambda: timm_exits.MultiExitTask(small_model(head="bottleneck"), loss, criterion_kwargs=kwargs, verbose=False)  # noqa: E731
    whole = make()
    whole.setup_ema(decay=0.5)
    optimizer = torch.optim.AdamW(whole.parameters(), lr=1e-3)
    uninterrupted = _train(whole, optimizer, 6)

    first = make()
    first.setup_ema(decay=0.5)
    optimizer = torch.optim.AdamW(first.parameters(), lr=1e-3)
    head = _train(first, optimizer, 3)
    checkpoint = {**first.get_checkpoint_state(), **first.get_checkpoint_state(ema=True), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, tmp_path / "run.pth")

    second = make()
    second.setup_ema(decay=0.5)
    optimizer = torch.optim.AdamW(second.parameters(), lr=1e-3)
    state = torch.load(tmp_path / "run.pth", weights_only=True)
    second.load_checkpoint_state(state["state_dict"], state["task_state"])
    second.load_checkpoint_state(state["state_dict_ema"], state["task_state_ema"], ema=True)
    optimizer.load_state_dict(state["optimizer"])
    assert head + _train(second, optimizer, 3, start=3) == uninterrupted
    if loss == "distillation":
        assert float(second.criterion.temperature) == float(whole.criterion.temperature) > 1.0
    for a, b in zip(whole.get_eval_model(ema=True).state_dict().values(), second.get_eval_model(ema=True).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_from_a_differently_wrapped_model_names_the_difference():
    saved = timm_exits.MultiExitTask(small_model(stages=(1, 2)), "eed", verbose=False).get_checkpoint_state()
    task = timm_exits.MultiExitTask(small_model(stages=(1, 2, 3)), "eed", verbose=False)
    with pytest.raises(RuntimeError, match=r"wrapped at stages=\['layer1', 'layer2'\](.|\n)*"
                                            r"this model is wrapped at stages=\['layer1', 'layer2', 'layer3'\]"):
        task.load_checkpoint_state(saved["state_dict"], saved["task_state"])
    # without the task state, the model itself names the keys
    with pytest.raises(RuntimeError, match=r"missing keys: exits\.2\.(.|\n)*only exit heads differ"):
        task.model.load_state_dict(saved["state_dict"])
    # the backbone's own checkpoint belongs in model.backbone
    with pytest.raises(RuntimeError, match=r"backbone alone(.|\n)*model.backbone.load_state_dict"):
        task.model.load_state_dict(task.model.backbone.state_dict())
    with pytest.raises(RuntimeError, match="trained with ExitEnsembleLoss but this task's criterion is DistillationBasedLoss"):
        timm_exits.MultiExitTask(small_model(stages=(1, 2)), "distillation", verbose=False).load_task_state(saved["task_state"])


def test_unwrap_and_a_wrapped_model_from_a_timm_checkpoint(tmp_path):
    task = timm_exits.MultiExitTask(small_model(), "eed", verbose=False)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    before = task.model.backbone.conv1[0].weight.clone()
    _train(task, optimizer, 1)
    plain = task.model.unwrap()
    assert type(plain).__name__ == "ResNet" and not torch.equal(plain.conv1[0].weight, before)
    x, _ = batch()
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), task.model(x)[-1], rtol=0, atol=0)
    # the trained backbone, saved as a plain timm checkpoint, builds a wrapped model again
    torch.save(plain.state_dict(), tmp_path / "backbone.pth")
    backbone = timm.create_model("resnet10t", num_classes=10, checkpoint_path=str(tmp_path / "backbone.pth"))
    rebuilt = timm_exits.wrap(backbone, stages=[1, 2, 3]).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[-1], plain(x), rtol=0, atol=0)


def test_ema_copies_model_and_loss():
    task = timm_exits.MultiExitTask(small_model(), "mate", verbose=False)
    ema = task.setup_ema(decay=0.0)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.5)
    _train(task, optimizer, 1)  # decay 0: the EMA equals the current weights
    assert torch.equal(task._trainable(ema=True).criterion.theta, task.criterion.theta)
    assert task.get_eval_model(ema=True) is ema.module.model
    assert set(task.get_checkpoint_state(ema=True)) == {"state_dict_ema", "task_state_ema"}


def test_fsdp2_on_cpu():
    if release("torch") < (2, 6):
        pytest.skip("FSDP2 on CPU needs torch >= 2.6 (torch.distributed.fsdp.fully_shard; 2.5's requires CUDA streams); "
                    f"this is torch {torch.__version__}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = str(ROOT / "tests" / "fsdp_check.py")
    done = subprocess.run([*torchrun, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(text for text in done.stdout.splitlines() if text.startswith("fsdp2:"))
    assert line.endswith("largest difference from rank 0: 0") and "moved 0 " not in line, line
