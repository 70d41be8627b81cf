"""What each exit costs: FLOPs and parameters per exit, counted with fvcore over one trace.

The wrapped model's eval forward is traced once, with each segment of the backbone and each exit
head registered as a module, so fvcore's per-module attribution gives every segment's and every
head's FLOPs from the same analysis; exit k costs segments 0..k plus head k. FLOPs follow
fvcore's convention (one fused multiply-add = one FLOP; elementwise operations are free), per
sample. `FLOP_HANDLES` adds the operators fvcore leaves out but that do real work (fused
attention, pooling and reductions, LSTMs, convolutions with string padding, RMSNorm, bicubic
interpolation); the operators still uncounted are named in the report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..fx import tracing
from ..fx.inputs import check_input_size, default_input_size, dummy_input
from ..fx.modes import evaluating
from ..heads import head_kind
from ..model import ExitRun, ExitStep, MultiExitModel
from .handles import FLOP_HANDLES
from .report import ExitCost, FlopsReport

__all__ = ["flops_report", "InputSizeError"]


# -- counting ---------------------------------------------------------------------------------------


def _guard(op: str, handle: Callable, failed: dict[str, str]) -> Callable:
    """A handle that, if it raises, records the operator and its error and counts 0: the report still comes."""

    def counted(inputs, outputs):
        try:
            return handle(inputs, outputs)
        except Exception as err:  # noqa: BLE001 - any failure of a handle is reported, not raised
            failed.setdefault(op, f"{type(err).__name__}: {err}")
            return 0

    return counted


def _analysis(module: nn.Module, inputs: tuple, handles: dict | None, failed: dict[str, str]):
    # lazy: importing fvcore.nn runs torch.jit.script, which warns (a FutureWarning on newer torch) at `import timm_exits`
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

    table = {**_DEFAULT_SUPPORTED_OPS, **FLOP_HANDLES, **(handles or {})}
    analysis = FlopCountAnalysis(module, inputs)
    for op, handle in table.items():
        analysis.set_op_handle(op, None if handle is None else _guard(op, handle, failed))
    # "caller": an op belongs to every module running when it runs, so the backbone's modules
    # (called from inside a segment) still count towards that segment
    # tracer warnings "all": `_count_once` records them to find data-dependent branches
    return analysis.ancestor_mode("caller").unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("all")


class _Probe(nn.Module):
    """The wrapped model's eval forward, with its steps registered so that fvcore scopes each segment and head."""

    def __init__(self, steps: list[ExitStep]):
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x):
        return tuple(out.logits for out in ExitRun(list(self.steps), x))


def _segment_params(segment: fx.GraphModule, seen: set[int]) -> int:
    """Parameters a segment's graph reads (modules it calls, attributes it fetches) not counted before."""
    count = 0
    for node in segment.graph.nodes:
        if node.op == "call_module":
            tensors = segment.get_submodule(node.target).parameters()
        elif node.op == "get_attr":
            obj = functools.reduce(getattr, node.target.split("."), segment)
            tensors = obj.parameters() if isinstance(obj, nn.Module) else [obj] if isinstance(obj, nn.Parameter) else []
        else:
            continue
        for p in tensors:
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    return count


def _used_params(fn: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> int:
    """Parameters the output of ``fn()`` depends on (through autograd)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(fn().float().sum(), params, allow_unused=True)
    return sum(p.numel() for p, g in zip(params, grads) if g is not None)


@dataclasses.dataclass
class _Counts:
    """Raw counts for a batch, one entry per exit: the backbone's are cumulative."""

    backbone_flops: list
    backbone_params: list
    head_flops: list
    uncounted: Counter
    notes: list


def _count_segments(steps: list[ExitStep], x: torch.Tensor, handles, failed) -> _Counts:
    """One trace of every step; each segment's and head's FLOPs read from it."""
    analysis = _analysis(_Probe(steps), (x,), handles, failed)
    by_module = analysis.by_module()
    seen: set[int] = set()
    return _Counts(
        backbone_flops=list(itertools.accumulate(by_module[f"steps.{k}.segment"] for k in range(len(steps)))),
        backbone_params=list(itertools.accumulate(_segment_params(s.segment, seen) for s in steps)),
        head_flops=[by_module[f"steps.{k}.head"] for k in range(len(steps) - 1)] + [0],
        uncounted=Counter(analysis.unsupported_ops()),
        notes=[],
    )


def _count_standalone(backbone: nn.Module, steps: list[ExitStep], x: torch.Tensor, handles, failed) -> _Counts:
    """Steps that share one pass (the forward_intermediates fallback) cannot be scoped apart: one trace per exit."""
    params = list(backbone.parameters())
    counts = _Counts([], [], [], Counter(), [
        "fx could not trace this backbone: it runs through forward_intermediates, and each exit was counted with its own trace"
    ])
    for step in steps:
        alone = step.standalone
        analysis = _analysis(alone, (x,), handles, failed)
        counts.backbone_flops.append(analysis.total())
        counts.backbone_params.append(_used_params(lambda alone=alone: alone(x), params))
        counts.uncounted.update(analysis.unsupported_ops())
        if step.head is None:
            counts.head_flops.append(0)
            continue
        feature = alone(x)
        # FLOPs follow shapes
        previous = (torch.zeros(x.shape[0], step.head.previous.in_features, dtype=x.dtype, device=x.device),) if step.cascaded else ()
        head_analysis = _analysis(step.head, (feature, *previous), handles, failed)
        counts.head_flops.append(head_analysis.total())
        counts.uncounted.update(head_analysis.unsupported_ops())
    return counts


@contextlib.contextmanager
def _hooks_restored(roots: Sequence[nn.Module]):
    """Remove every forward hook a count adds under `roots`, also when it fails (fvcore removes its own only on success)."""
    modules = {id(m): m for root in roots for m in root.modules()}
    before = {key: (set(m._forward_pre_hooks), set(m._forward_hooks)) for key, m in modules.items()}
    try:
        yield
    finally:
        for key, m in modules.items():
            pre, post = before[key]
            for hook_id in [h for h in m._forward_pre_hooks if h not in pre]:
                del m._forward_pre_hooks[hook_id]
                m._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            for hook_id in [h for h in m._forward_hooks if h not in post]:
                del m._forward_hooks[hook_id]
                m._forward_hooks_with_kwargs.pop(hook_id, None)
                m._forward_hooks_always_called.pop(hook_id, None)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _branch_sites(caught: list[warnings.WarningMessage]) -> list[str]:
    """Where the traced code turned a tensor into a Python bool or number, outside torch itself.

    Inside torch these come from ``torch._assert`` and from formatting its message (timm's shape
    checks), which do not change what is computed; elsewhere they are a branch, a loop count or a
    size taken from the data, and the trace holds for this input only.
    """
    sites = []
    for w in caught:
        inside = w.filename.startswith(_TORCH_DIR) or w.filename == tracing.__file__  # tracing.assert_formatted: a shape check
        if issubclass(w.category, torch.jit.TracerWarning) and "Converting a tensor to a Python" in str(w.message) and not inside:
            site = f"{w.filename}:{w.lineno}"
            if site not in sites:
                sites.append(site)
    return sites


def _count(model: nn.Module, backbone: nn.Module, x: torch.Tensor, handles, failed: dict[str, str]) -> _Counts:
    """`_count_once`, and a second count on ``-x`` where the trace read tensor values into Python.

    The jit trace records one path through the code. Where the code branched on the data, the count
    is that path's: the report says so, with the sites and what the other input cost.
    """
    counts, sites = _count_once(model, backbone, x, handles, failed)
    if sites:
        other, _ = _count_once(model, backbone, -x, handles, {})
        where = ", ".join(sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")
        if other.backbone_flops[-1] != counts.backbone_flops[-1] or other.head_flops != counts.head_flops:
            first, second = (c.backbone_flops[-1] / x.shape[0] for c in (counts, other))
            counts.notes.append(
                f"the count depends on the example input: the model branches on tensor values (at {where}); "
                f"the backbone counted {first:,.0f} FLOPs on this input and {second:,.0f} on its negation. "
                "Pass example_input= with representative data, and read the counts as this input's"
            )
        else:
            counts.notes.append(
                f"the model reads tensor values into Python (at {where}); "
                "a second input gave the same count, but other inputs may take another path"
            )
    return counts


def _count_once(model: nn.Module, backbone: nn.Module, x: torch.Tensor, handles, failed: dict[str, str]) -> tuple[_Counts, list[str]]:
    """Count `model` in eval mode; every submodule's own mode comes back, and every hook the count added goes.

    fvcore scopes a trace with hooks on every module it analyses, and two counts over the same
    modules at once would push and pop each other's scopes (and abort the jit tracer). `evaluating`
    holds the lock every mode-changing call takes, so counts take turns. Also returns where the
    trace read tensor values into Python (`_branch_sites`).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = _count_traced(model, backbone, x, handles, failed)
    return counts, _branch_sites(caught)


def _count_traced(model: nn.Module, backbone: nn.Module, x: torch.Tensor, handles, failed: dict[str, str]) -> _Counts:
    with evaluating(model):
        steps = [step.uncompiled() for step in model.steps()] if isinstance(model, MultiExitModel) else []  # fvcore traces the plain parts
        with _hooks_restored([model, *steps]), torch.no_grad():
            if not isinstance(model, MultiExitModel):
                analysis = _analysis(model, (x,), handles, failed)
                note = (
                    f"{type(model).__name__} is not a MultiExitModel: reported as a single exit "
                    "(timm_exits.wrap(model, stages=...) adds exits)"
                )
                return _Counts(
                    [analysis.total()], [sum(p.numel() for p in model.parameters())], [0], Counter(analysis.unsupported_ops()), [note]
                )
            if model.has_segments:
                return _count_segments(steps, x, handles, failed)
            return _count_standalone(backbone, steps, x, handles, failed)


def _sample(model: nn.Module, backbone: nn.Module, input_size, example_input) -> torch.Tensor:
    """The batch to count on: `example_input`, or one random sample of `input_size` (default: the wrapped size)."""
    wrapped = isinstance(model, MultiExitModel)
    if example_input is None:
        size = model.input_size if wrapped and input_size is None else check_input_size(input_size, backbone)
        if wrapped:
            model.check_channels(size[0], f"input_size={tuple(size)}")
        return dummy_input(backbone, size)
    if input_size is not None:
        raise ValueError("give input_size or example_input, not both")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError(
            f"example_input must be a batch tensor (B, C, H, W), got {getattr(example_input, 'shape', type(example_input).__name__)}"
        )
    if wrapped:
        model.check_channels(example_input.shape[1], f"example_input of shape {tuple(example_input.shape)}")
    return example_input


class InputSizeError(ValueError):
    """The model cannot run on the input `flops_report` was given, where it runs on its own size; ``failure`` is the model's own error."""

    def __init__(self, message: str, failure: Exception):
        super().__init__(message)
        self.failure = failure


def _check_runs(model: nn.Module, x: torch.Tensor, argument: str, counting_error: Exception) -> None:
    """After a failed count: if the model cannot run on `x` but runs on its own input size, name the argument that gave `x`
    (a model that fails on both has a fault of its own: the count's error stands)."""
    own = tuple(model.input_size) if isinstance(model, MultiExitModel) else default_input_size(model)
    if tuple(x.shape[1:]) == own:
        return
    with evaluating(model), torch.no_grad():
        try:
            model(x)
            return
        except Exception as err:  # noqa: BLE001 - whatever stops the model on `x` is the failure to report
            failure = err
        try:
            model(dummy_input(model, own))
        except Exception:  # noqa: BLE001 - it fails at its own size too: a fault of its own, the count's error stands
            return
        raise InputSizeError(
            f"{type(model).__name__} cannot run on an input of shape {tuple(x.shape)} (from {argument}), where it runs on its own "
            f"{own}: {tracing.error_line(failure)}; give {argument} as the model takes it",
            failure,
        ) from counting_error


def _labels(model: nn.Module) -> tuple[list[str], list[str], list[int]]:
    """Each exit's stage, head name and head parameters."""
    if not isinstance(model, MultiExitModel):
        return ["final"], ["model's own"], [0]
    stages = list(model.stages) + ["final"]
    heads = [head_kind(h) for h in model.exits] + ["backbone's own"]
    return stages, heads, [sum(p.numel() for p in h.parameters()) for h in model.exits] + [0]


def flops_report(model: nn.Module, input_size: Sequence[int] | None = None, *,
                 example_input: torch.Tensor | None = None, handles: dict | None = None) -> FlopsReport:
    """FLOPs and parameters of every exit of `model`, per sample, as a `FlopsReport`.

    Args:
        model: a `MultiExitModel` (one row per exit). Any other module is reported as a single
            exit, with a note saying so.
        input_size: ``(C, H, W)`` of one sample; defaults to the size the model was wrapped for.
        example_input: a batch to count on instead (counts are divided by its batch size).
        handles: extra or replacement fvcore handles, ``{"aten::op": (inputs, outputs) -> FLOPs}``;
            ``None`` as a handle leaves that operator uncounted.

    One fvcore trace of the eval-mode forward serves every exit. The model's training mode is
    restored afterwards. Example::

        >>> import timm, timm_exits
        >>> model = timm_exits.wrap(timm.create_model("resnet18"), stages=[1, 2, 3])
        >>> report = timm_exits.flops_report(model, input_size=(3, 224, 224))
        >>> round(report.exits[-1].flops / 1e9, 2)   # the plain resnet18
        1.82
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a MultiExitModel for one row per exit), got {type(model).__name__}")
    if handles is not None and not isinstance(handles, dict):
        raise TypeError(f"handles must be a dict of operator name -> handle, got {type(handles).__name__}")
    backbone = model.backbone if isinstance(model, MultiExitModel) else model
    x = _sample(model, backbone, input_size, example_input)
    batch = x.shape[0]
    failed: dict[str, str] = {}
    try:
        counts = _count(model, backbone, x, handles, failed)
    except Exception as err:
        _check_runs(model, x, "example_input" if example_input is not None else "input_size", err)
        raise
    unused = sum(p.numel() for p in backbone.parameters()) - counts.backbone_params[-1]
    if unused > 0:
        counts.notes.append(f"{unused:,} backbone parameters are not used in eval mode (auxiliary heads, for instance) and are not counted")
    stages, heads, head_params = _labels(model)
    per = lambda v: v // batch if v % batch == 0 else v / batch  # noqa: E731 - counts are linear in the batch
    full = per(counts.backbone_flops[-1])
    exits = []
    for k, stage in enumerate(stages):
        bb, hd = per(counts.backbone_flops[k]), per(counts.head_flops[k])
        bp = counts.backbone_params[k]
        exits.append(ExitCost(k, stage, heads[k], bb, hd, bb + hd, (bb + hd) / full if full else float("nan"),
                              bp, head_params[k], bp + head_params[k]))
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return FlopsReport(
        model=cfg.get("architecture") or type(backbone).__name__,
        input_size=tuple(int(v) for v in x.shape[1:]),
        exits=exits,
        backbone_flops=full,
        all_exits_flops=full + sum(e.head_flops for e in exits),
        uncounted_ops=dict(counts.uncounted),
        failed_ops=failed,
        notes=counts.notes,
    )
