"""`wrap`: a backbone cut at its stages, an exit head after each cut."""
from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence

from torch import nn

from .._checks import positive_int
from ..fx.surgery import plan_exits
from ..fx.tracing import TraceOptions
from ..heads import CascadedHead, ExitHeads, check_head, create_head
from .multi_exit import MultiExitModel

__all__ = ["wrap"]



def wrap(
    model: nn.Module,
    stages: Sequence[int | str],
    head="linear",
    num_classes: int | None = None,
    *,
    head_kwargs: dict | None = None,
    eval_output: str | int = "all",
    input_size: Sequence[int] | None = None,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence = (),
    cascade: bool | str = False,
) -> MultiExitModel:
    """Attach exit classifiers to `model` after each of `stages`; returns a `MultiExitModel`.

    Args:
        model: a timm or torchvision classifier (any module torch.fx can trace that returns
            ``(B, num_classes)`` logits).
        stages: where to attach exits, shallow to deep: indices into the model's stage table
            (timm's ``feature_info``: for resnet50, 1=layer1, 2=layer2, 3=layer3; negative
            indices count from the end), module names (``"layer2"``, ``"blocks.5"``) or graph
            node names. `timm_exits.list_stages(model)` prints the table. The final stage cannot
            be one: the backbone's own head is always the last exit. Or a placement rule:
            ``timm_exits.at_flops(0.25, 0.5, 0.75)`` picks the stages by their share of FLOPs.
        head: a head name (``"linear"``, ``"sdn"``, ``"conv"``, ``"bottleneck"``, ``"replica"``),
            a callable ``(channels, num_classes, layout) -> nn.Module``, or a list of those,
            one per exit.
        num_classes: optional check; it must equal the backbone's output width.
        head_kwargs: extra keyword arguments for the head constructor.
        eval_output: ``"all"`` (a list in eval too), ``"final"``, ``"ensemble"`` or an exit index
            (one tensor in eval).
        input_size: ``(C, H, W)`` of the dummy input used to learn the features' shapes;
            defaults to the model's own (its patch embedding's, its pretrained_cfg's, or 3x224x224).
        leaf_modules, autowrap_functions: extra modules / functions fx should not trace into.
        cascade: ``True`` makes every exit head after the first also read the previous exit's
            logits (Zero Time Waste's cascade, `timm_exits.heads.CascadedHead`); ``"layernorm"``
            puts a LayerNorm on those logits first. The backbone's own head is not cascaded.

    Example::

        >>> import timm, torch, timm_exits
        >>> model = timm_exits.wrap(timm.create_model("resnet18", num_classes=10), stages=[1, 2, 3])
        >>> [tuple(z.shape) for z in model(torch.randn(2, 3, 64, 64))]
        [(2, 10), (2, 10), (2, 10), (2, 10)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, MultiExitModel):
        raise TypeError("model is already a MultiExitModel; wrap its .backbone instead")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"model is a {type(model).__name__}: wrap the model inside it (model.module), "
            f"then apply {type(model).__name__} to the wrapped model"
        )
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise TypeError("model is compiled (torch.compile): wrap the plain model (model._orig_mod), then compile the wrapped model")
    if num_classes is not None:
        num_classes = positive_int(num_classes, "num_classes", "a check of the backbone's number of classes; or leave it out")
    resolve = getattr(stages, "resolve", None)
    if callable(resolve):  # a placement rule such as at_flops(): it picks the stages for this model
        stages = resolve(model, input_size, leaf_modules, autowrap_functions)
    plan = plan_exits(model, stages, input_size, TraceOptions.of(leaf_modules, autowrap_functions))
    if num_classes is not None and num_classes != plan.num_classes:
        raise ValueError(
            f"num_classes={num_classes} disagrees with the backbone, whose head outputs {plan.num_classes} classes; "
            f"create the backbone with num_classes={num_classes} (timm: create_model(name, num_classes={num_classes}); "
            "or reset_classifier) or leave num_classes out"
        )
    if cascade not in (False, True, "layernorm") or not isinstance(cascade, (bool, str)):
        raise ValueError(f"cascade must be False, True or 'layernorm', got {cascade!r}")
    if cascade and len(plan.sites) < 2:
        raise ValueError(
            f"cascade={cascade!r} needs at least two exit heads (a head after the first reads the one before it); "
            f"stages {plan.stage_names} give {len(plan.sites)}"
        )
    heads = list(head) if isinstance(head, (list, tuple)) else [head] * len(plan.sites)
    if len(heads) != len(plan.sites):
        raise ValueError(
            f"head has {len(heads)} entries but there are {len(plan.sites)} stages {plan.stage_names}; give one head or one per stage"
        )
    exits = ExitHeads([create_head(h, site, plan.num_classes, **(head_kwargs or {})) for h, site in zip(heads, plan.sites)],
                      plan.stage_names)
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        exits.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    for k, (h, site, module) in enumerate(zip(heads, plan.sites, exits)):
        name = h if isinstance(h, str) else getattr(h, "__name__", type(h).__name__)
        check_head(module, site, plan.num_classes, f"the head of exit {k + 1} ({site.stage!r}, {name})")
    for k in range(1, len(exits) if cascade else 0):
        exits[k] = CascadedHead(exits[k], plan.num_classes, norm=cascade == "layernorm")
    plan.sites = []  # the heads are built; drop the traced graphs the sites refer to
    # what builds this wrap again from the backbone (timm_exits.save_pretrained writes it to config.json)
    wrap_args = {"stages": list(plan.stage_names), "head": [_reference(h) for h in heads], "head_kwargs": dict(head_kwargs or {}),
                 "input_size": list(plan.input_size), "leaf_modules": [_reference(m) for m in leaf_modules],
                 "autowrap_functions": [_reference(f) for f in autowrap_functions], "cascade": cascade}
    wrapped = MultiExitModel(model, plan, exits, eval_output=eval_output, wrap_args=wrap_args)
    return wrapped


def _reference(obj) -> str:
    """A head name as it is; a class or function as ``module:qualname`` (``<locals>`` in it: not importable); anything else ``<...>``."""
    if isinstance(obj, str):
        return obj
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        return f"<a {type(obj).__qualname__} instance>"  # a functools.partial, a callable object: no name imports it
    parts = obj.__module__.split(".")
    while len(parts) > 1 and getattr(sys.modules.get(".".join(parts[:-1])), obj.__qualname__, None) is obj:
        parts.pop()  # the public path a package re-exports it from (timm_exits.heads, not timm_exits.heads.builtin)
    return f"{'.'.join(parts)}:{obj.__qualname__}"
