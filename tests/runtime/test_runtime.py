"""The runtime as a user meets it: a failed call leaves the model as it was, concurrent first calls
agree with sequential ones, and no call flips a switch someone else can see."""
import copy
import pathlib
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import timm
import torch
import torch.fx as fx
from torch import nn

import timm_exits
from conftest import exactly, fallback_resnet

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class RaisesWhenTraced(nn.Module):
    """A linear exit head that fails inside the jit tracer fvcore counts with, and nowhere else."""

    def __init__(self, channels, num_classes, layout):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x, return_features=False):
        if torch.jit.is_tracing():
            raise RuntimeError("this head cannot be traced")
        feature = x.mean((2, 3))
        return (self.fc(feature), feature) if return_features else self.fc(feature)


def resnet(head="linear"):
    torch.manual_seed(0)
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2], head=head, input_size=(3, 32, 32))


def hooks(model: timm_exits.MultiExitModel) -> int:
    """Forward hooks on the model's modules and on the modules of its steps (both modes)."""
    roots = [model, *model.steps(training=True), *model.steps(training=False)]
    modules = {id(m): m for root in roots for m in root.modules()}.values()
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def proxies(model: nn.Module) -> int:
    return sum(isinstance(v, fx.Proxy) for m in model.modules() for v in vars(m).values())


def state(model: timm_exits.MultiExitModel) -> dict:
    """What a user could observe of the model: its modes, attributes, hooks, proxies and output."""
    modes = {name: m.training for name, m in model.named_modules()}
    was = model.training
    model.eval()
    with torch.no_grad():
        outputs = [z.clone() for z in model.forward_exits(X)]
    for name, m in model.named_modules():
        m.training = modes[name]
    return {"modes": modes, "attributes": sorted(vars(model)), "hooks": hooks(model), "proxies": proxies(model),
            "outputs": outputs, "was": was}


def assert_unchanged(before: dict, model) -> None:
    after = state(model)
    assert after["modes"] == before["modes"] and after["attributes"] == before["attributes"]
    assert after["hooks"] == 0 and after["proxies"] == 0
    for a, b in zip(after["outputs"], before["outputs"], strict=True):
        assert torch.equal(a, b)
    pickle.dumps(model)  # fvcore's hooks are local classes: a model left with them does not pickle
    copy.deepcopy(model)


FAILING_CALLS = {  # the call, whether it needs eval mode, the error it must raise
    "flops_report, an input of 1 channel": (
        lambda m: timm_exits.flops_report(m, input_size=(1, 32, 32)), False,
        ValueError, exactly("input_size=(1, 32, 32) has 1 channel; the model's first layer (conv1) expects 3"),
    ),
    "flops_report, an example of 2 channels": (
        lambda m: timm_exits.flops_report(m, example_input=torch.randn(2, 2, 32, 32)), False,
        ValueError, exactly("example_input of shape (2, 2, 32, 32) has 2 channels; the model's first layer (conv1) expects 3"),
    ),
    "first early_exit, an input of 1 channel": (
        lambda m: m.early_exit(torch.randn(4, 1, 32, 32)), True,
        ValueError, exactly("x of shape (4, 1, 32, 32) has 1 channel; the model's first layer (conv1) expects 3"),
    ),
}


@pytest.mark.parametrize("call", FAILING_CALLS.values(), ids=FAILING_CALLS.keys())
def test_a_wrong_channel_count_is_named_before_anything_runs(call):
    fn, needs_eval, error, message = call
    model = resnet().train()
    model.backbone.bn1.eval()  # frozen by the user
    if needs_eval:
        model.eval()
    before = state(model)
    with pytest.raises(error, match=message):
        fn(model)
    assert_unchanged(before, model)


@pytest.mark.parametrize("build", [resnet, fallback_resnet], ids=["traced", "fallback"])
@pytest.mark.parametrize("call", ["flops_report", "early_exit"])
def test_a_call_that_fails_inside_the_count_leaves_the_model_as_it_was(build, call):
    model = build(head=RaisesWhenTraced).train()
    model.backbone.bn1.eval()
    if call == "early_exit":  # its first call counts what each exit costs
        model.eval()
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="this head cannot be traced"):
            timm_exits.flops_report(model) if call == "flops_report" else model.early_exit(X)
    assert_unchanged(before, model)


def test_after_a_failed_count_the_next_one_is_the_same_as_on_a_fresh_model():
    failing = resnet(head=RaisesWhenTraced).eval()
    with pytest.raises(RuntimeError):
        timm_exits.flops_report(failing)
    failing.exits = resnet().exits  # heads that trace, of the same size: the steps take the new heads
    fresh = resnet()
    assert timm_exits.flops_report(failing).to_dict() == timm_exits.flops_report(fresh).to_dict()


@pytest.mark.parametrize("build", [resnet, fallback_resnet], ids=["traced", "fallback"])
def test_a_call_that_succeeds_leaves_no_hooks_and_nothing_on_the_model(build):
    model = build().eval()
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_exits.flops_report(model)
        result = model.early_exit(X, threshold=0.3)
    assert_unchanged(before, model)  # early exit learned its facts somewhere else than in model.__dict__
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = other.early_exit(X, threshold=0.3)  # a copy learns again, and comes to the same answer
        assert torch.equal(again.exit_index, result.exit_index) and torch.equal(again.flops, result.flops)
        torch.testing.assert_close(again.logits, result.logits)


CONCURRENT = textwrap.dedent(
    """
    import sys, threading, warnings
    import timm, torch, timm_exits

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        return timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1, 2, 3], input_size=(3, 32, 32)).eval()

    # two input sizes: a thread may count the costs of one while another already runs the other
    inputs = [torch.randn(6, 3, 32 + 8 * (i % 2), 32 + 8 * (i % 2), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    reference = build()
    with torch.no_grad():  # each early exit's median confidence: the samples leave at every exit
        scores = [torch.cat([reference(x)[k].softmax(-1).amax(-1) for x in inputs]) for k in range(3)]
    thresholds = [s.median().item() for s in scores]
    expected = [reference.early_exit(x, threshold=thresholds) for x in inputs]
    reports = [timm_exits.flops_report(reference, input_size=tuple(x.shape[1:])).to_dict() for x in inputs]
    assert len(set(torch.cat([e.exit_index for e in expected]).tolist())) > 2, "the thresholds must spread samples over the exits"

    def together(calls):
        results, errors, start = [None] * len(calls), [], threading.Barrier(len(calls))

        def call(i):
            start.wait()
            try:
                results[i] = calls[i]()
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        return results

    for trial in range(int(sys.argv[1])):
        for n in (2, 3, 4):
            model = build()  # cold: nothing learned about it yet
            for got, want in zip(together([lambda i=i: model.early_exit(inputs[i], threshold=thresholds) for i in range(n)]), expected):
                assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.flops, want.flops), (trial, n)
                assert torch.equal(got.logits, want.logits), (trial, n)
            model = build()  # FLOPs counts of one model from several threads, beside early exit
            calls = [lambda i=i: timm_exits.flops_report(model, input_size=tuple(inputs[i].shape[1:])).to_dict() for i in range(n)]
            calls.append(lambda: model.early_exit(inputs[0], threshold=thresholds))
            *counted, early = together(calls)
            assert counted == reports[:n] and torch.equal(early.exit_index, expected[0].exit_index), (trial, n)
    print("agreed")
    """
)


def test_threads_calling_early_exit_on_a_cold_model_agree_with_sequential_calls():
    # in a subprocess: a crash of the jit tracer aborts the interpreter, which must fail this test, not the run
    proc = subprocess.run([sys.executable, "-c", CONCURRENT, "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "agreed", proc.stdout[-2000:] + proc.stderr[-4000:]


def test_collect_exit_logits_never_changes_what_other_callers_see():
    model = resnet().eval()
    model.eval_output = "final"
    inside = []  # what code running inside the collection's forward sees
    model.exits[0].register_forward_hook(lambda *_: inside.append(model.eval_output))
    loader = [(X, torch.zeros(4, dtype=torch.long))] * 12
    seen, outputs, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            seen.add(model.eval_output)
            with torch.no_grad():
                outputs.append(type(model(X[:1])))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        cached = timm_exits.collect_exit_logits(model, loader)
    finally:
        stop.set()
        reader.join()
    assert set(inside) == {"final"} and len(inside) >= 12
    assert seen == {"final"} and set(outputs) == {torch.Tensor} and model.eval_output == "final"
    assert cached.logits.shape == (3, 48, 5)


def test_calls_that_change_modes_from_several_threads_give_each_submodule_its_flag_back():
    from fvcore.nn.jit_handles import conv_flop_jit

    def slow(inputs, outputs):  # keeps the first count going while the others start
        time.sleep(0.01)
        return conv_flop_jit(inputs, outputs)

    model = resnet().train()
    model.backbone.bn1.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    expected = timm_exits.flops_report(model).to_dict()
    results, errors = {}, []

    def call(name, fn, delay):
        time.sleep(delay)
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"{name}: {type(err).__name__}: {err}")

    calls = {
        "slow count": (lambda: timm_exits.flops_report(model, handles={"aten::_convolution": slow}).to_dict(), 0.0),
        "count": (lambda: timm_exits.flops_report(model).to_dict(), 0.05),
        "collect": (lambda: timm_exits.collect_exit_logits(model, [(X, torch.zeros(4, dtype=torch.long))] * 4), 0.1),
    }
    threads = [threading.Thread(target=call, args=(name, fn, delay)) for name, (fn, delay) in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results["slow count"] == expected and results["count"] == expected
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():  # no batch norm ran in training mode on the counting input
        assert torch.equal(value, stats[key]), key


@pytest.mark.parametrize("call", ["collect_exit_logits", "export_exits", "flops_report"])
def test_a_frozen_batch_norm_stays_frozen(call):
    model = resnet().train()
    model.backbone.bn1.eval()
    model.exits[0].eval()  # any submodule the user set apart
    modes = {name: m.training for name, m in model.named_modules()}
    if call == "collect_exit_logits":
        timm_exits.collect_exit_logits(model, [(X, torch.zeros(4, dtype=torch.long))])
    elif call == "export_exits":
        timm_exits.export_exits(model, X)
    else:
        timm_exits.flops_report(model)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_no_module_outside_model_reads_the_models_private_attributes():
    package = pathlib.Path(timm_exits.__file__).parent
    private = re.compile(r"\bmodel\.(?:_[a-z]\w*|__dict__)|\bvars\(model\)|getattr\(model, [\"']_")
    found = {str(p.relative_to(package)): private.findall(p.read_text()) for p in package.rglob("*.py") if p.parent.name != "model"}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_early_exit_learns_again_when_a_head_is_replaced():
    model = resnet().eval()
    first = model.early_exit(X, threshold=0.0)  # everyone leaves at exit 1
    model.exits[0] = resnet(head="conv").exits[0]  # a dearer head
    again = model.early_exit(X, threshold=0.0)
    cost = timm_exits.flops_report(model).exits[0].flops
    assert torch.equal(again.flops, torch.full((4,), float(cost))) and not torch.equal(again.flops, first.flops)
    with torch.no_grad():
        torch.testing.assert_close(again.logits, model.exits[0](model.segments()[0](X)[0]))


def test_cached_exit_logits_keep_no_autograd_graph():
    """Each batch's graph would stay alive through the cache: memory growing with the data set."""
    import timm

    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1], input_size=(3, 32, 32)).train()
    cached = timm_exits.collect_exit_logits(model, [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))] * 2)
    assert not cached.logits.requires_grad and cached.logits.grad_fn is None and model.training
