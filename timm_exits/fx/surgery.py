"""Cutting a traced classifier into segments, one per exit: the plan `wrap()` builds.

The pipeline `plan_exits` runs at `wrap()` time:

1. trace the backbone twice, in training and in eval mode (fx bakes `if self.training:` branches
   into the graph, so each mode needs its own graph), recording for every node the module it
   was created in;
2. run the eval graph once on a dummy input to learn every node's shape;
3. build the stage table: timm's ``feature_info`` when the model has one, otherwise the stages
   found in the graph (the last single-value cut before each drop in resolution; for models
   whose resolution never drops, the blocks of the transformer);
4. resolve the user's ``stages`` against that table (indices, module names or graph node names);
5. cut both graphs into one segment per exit. Values that are still needed after a cut (skip
   connections, multi-branch stages, shapes) are carried to the next segment as a tuple.

Segments reference the backbone's modules by their original names, so no parameter is copied.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .classifier import check_classifier, classifier_node, first_input, first_layer
from .inputs import check_input_size, dummy_input
from .modes import set_training
from .stages import FeatureLayout, Stage, describe, feature_layout, final_stage, own_size_shapes, read_feature, stage_table
from .tracing import (
    TracedGraph,
    TraceError,
    TraceOptions,
    closes_block,
    last_uses,
    live_after,
    shapes_at,
    trace,
)

__all__ = ["ExitPlan", "ExitSite", "plan_exits", "split"]


@dataclass
class ExitSite:
    """What a head needs to know about the feature it reads."""

    stage: str
    channels: int
    layout: FeatureLayout
    shape: tuple[int, ...]  # feature shape on the dummy input, batch dim included
    reduction: int | None
    final_channels: int  # width of the backbone's pre-logits features
    final_reduction: int | None
    replicate: Any = None  # () -> (block copies, out channels, out layout), for the `replica` head


@dataclass
class ExitPlan:
    """Everything `wrap()` learned about the backbone: segments' graphs and what each exit reads."""

    eval_segments: list[fx.Graph]
    train_segments: list[fx.Graph]
    sites: list[ExitSite]
    stage_names: list[str]
    num_classes: int
    input_size: tuple[int, ...]
    feature_indices: list[int] | None = None  # set when the model runs through forward_intermediates
    first_layer: tuple[str, int] | None = None  # the convolution reading the input, and its input channels

    def __deepcopy__(self, memo):
        return self  # never changed after wrap(); copies of a model share it (and its graphs)


def _resolve(spec, table: list[Stage], traced: TracedGraph, module_names: set[str]) -> tuple[str, fx.Node]:
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise TypeError(
            "each entry of `stages` must be an int (index into the stage table) or a str (module or node name), "
            f"got {spec!r} of type {type(spec).__name__}"
        )
    if isinstance(spec, int):
        if not -len(table) <= spec < len(table):
            raise ValueError(
                f"stage index {spec} is out of range: this model has {len(table)} stages (indices 0..{len(table) - 1}, "
                f"negative counting from the end):\n{describe(table)}"
            )
        stage = table[spec]
        if not stage.usable:
            raise ValueError(
                f"stage {spec} ({stage.name!r}) cannot take an exit: {stage.reason}. The model's stages are:\n{describe(table)}"
            )
        return stage.name, traced.find(stage.name)
    node = traced.find(spec) if spec in module_names else traced.by_name(spec)
    if node is not None and node.op in ("get_attr", "placeholder", "output"):
        what = {"get_attr": "a parameter or buffer", "placeholder": "the input", "output": "the output"}[node.op]
        raise ValueError(f"stage {spec!r} is {what} of the model, not a feature it computes. The model's stages are:\n{describe(table)}")
    if node is None:
        raise ValueError(
            f"unknown stage {spec!r}: it is neither a module name of the model (see model.named_modules()) "
            f"nor a node of its traced graph (see timm_exits.graph_node_names(model)). The model's stages are:\n{describe(table)}"
        )
    return spec, node


def split(traced: TracedGraph, cuts: list[fx.Node], pre_logits: fx.Node | None, prefix: str = "backbone.") -> list[fx.Graph]:
    """Cut `traced` after each node of `cuts` into len(cuts) + 1 graphs.

    Segment k computes from cut k-1 to cut k and returns ``(feature_k, carried)``, where
    ``carried`` holds every value a later node still reads. The last segment returns
    ``(backbone output, pre-logits feature or None)``. Module and attribute targets get `prefix`
    so the segments can be bound to a holder whose only child is the backbone.
    """
    last_use = last_uses(traced)
    pos = traced.position
    bounds = [pos[c] for c in cuts] + [len(traced.nodes) - 1]
    inputs = [n for n in traced.nodes if n.op == "placeholder"]
    graphs, start = [], -1
    for k, end in enumerate(bounds):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, n in enumerate(inputs):
            if k == 0:
                env[n] = g.placeholder(n.target, default_value=n.args[0] if n.args else inspect.Signature.empty)
            else:
                env[n] = g.placeholder(f"carry_{i}")

        def lookup(n: fx.Node, env=env, g=g) -> fx.Node:
            if n not in env:  # parameters and buffers are fetched again in every segment
                env[n] = g.get_attr(prefix + n.target)
            return env[n]

        last = k == len(bounds) - 1
        for n in traced.nodes[start + 1 : end + (0 if last else 1)]:
            if n.op in ("placeholder", "get_attr"):
                continue
            new = g.node_copy(n, lookup)
            if n.op == "call_module":
                new.target = prefix + n.target
            env[n] = new
        if last:
            out = fx.map_arg(traced.nodes[-1].args[0], lookup)
            g.output((out, env.get(pre_logits) if pre_logits is not None else None))
        else:
            carried = live_after(traced, end, last_use)
            g.output((env[cuts[k]], tuple(env[n] for n in carried)))
            inputs, start = carried, end
        g.lint()
        graphs.append(g)
    return graphs


def _replicate(model, traced, shapes, last_use, table, start: fx.Node):
    """Copies of the first block of every stage after `start` (MSD's branch replicas).

    A stage's first block is the graph from the previous cut to the first clean cut that already
    has the stage's output shape (resnet's layer2.0, a MobileNet stage's strided block). Each is
    a GraphModule over deep copies of just the modules it calls, so it trains on its own.
    """
    pos = traced.position
    blocks, layout, prev = [], None, start
    for stage in table:
        end = traced.find(stage.name)
        if pos[end] <= pos[start]:
            continue
        first = next(c for c in traced.nodes[pos[prev] + 1 : pos[end] + 1]
                     if closes_block(traced, last_use, prev, c) and shapes.get(c) is not None and shapes[c][1:] == shapes[end][1:])
        region = traced.nodes[pos[prev] + 1 : pos[first] + 1]
        reads = {a for n in region for a in n.all_input_nodes if pos[a] <= pos[prev] and a.op != "get_attr"}
        if reads != {prev}:
            raise ValueError(
                f"the replica head needs a block that reads only the stage output {prev.name!r}, "
                f"but it reads {sorted(a.name for a in reads)}"
            )
        piece = fx.Graph()
        env = {prev: piece.placeholder("x")}
        for n in region:
            env[n] = piece.node_copy(n, lambda a, env=env, piece=piece: env[a] if a in env else env.setdefault(a, piece.get_attr(a.target)))
        piece.output(env[first])
        blocks.append(copy.deepcopy(fx.GraphModule(model, piece, class_name="ReplicaBlock")))
        layout, channels, prev = FeatureLayout(stage.layout), stage.channels, end
    if not blocks:
        raise ValueError("the replica head needs at least one stage after the exit")
    if layout.format == "NLC":
        layout = feature_layout((1, 2, channels), channels, model)
    return blocks, channels, layout


def plan_exits(model: nn.Module, stages, input_size=None, options: TraceOptions = TraceOptions()) -> ExitPlan:
    """Trace, resolve `stages` and cut: everything `wrap()` needs to build a MultiExitModel."""
    if isinstance(stages, (int, str)):
        stages = [stages]
    if not isinstance(stages, Sequence) or isinstance(stages, (bytes, bytearray)):
        raise TypeError(f"stages must be a list of stage indices or names, got {type(stages).__name__}")
    if len(stages) == 0:
        raise ValueError(
            "stages is empty: give at least one stage to attach an exit to, e.g. stages=[1, 2, 3]; see timm_exits.list_stages(model)"
        )
    check_classifier(model)
    size = check_input_size(input_size, model)
    try:
        eval_traced = trace(model, False, options)
        train_traced = trace(model, True, options)
    except TraceError as err:
        if (not all(callable(getattr(model, a, None)) for a in ("forward_intermediates", "forward_head"))
                or not getattr(model, "feature_info", None)):
            raise
        warnings.warn(
            f"{err} Falling back to {type(model).__name__}.forward_intermediates: every exit is computed on every call, "
            "so early exits save no compute.",
            stacklevel=3,
        )
        return _plan_from_intermediates(model, stages, size)
    shapes, out = shapes_at(model, eval_traced, size, given=input_size is not None)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(
            f"the backbone must return logits of shape (B, num_classes) in eval mode; {type(model).__name__} returned {_shape_of(out)}"
        )
    last_use = last_uses(eval_traced)
    table = stage_table(model, eval_traced, shapes, last_use, size[1:], own_size_shapes(model, eval_traced, size, shapes))
    final = final_stage(table)
    module_names = {n for n, _ in model.named_modules()}

    resolved = [_resolve(s, table, eval_traced, module_names) for s in stages]
    pos = eval_traced.position
    names = [name for name, _ in resolved]
    for (prev, a), (name, b) in itertools.pairwise(resolved):
        if pos[b] <= pos[a]:
            kind = "repeated" if pos[a] == pos[b] else "out of order"
            raise ValueError(f"stages must be distinct and ordered shallow to deep; {name!r} is {kind} after {prev!r} in {list(stages)!r}")
    classifier = classifier_node(model, eval_traced)
    limit = pos[eval_traced.find(final.name)] if final else (pos[classifier] if classifier is not None else len(pos) - 1)
    for (name, node), spec in zip(resolved, stages):
        if pos[node] >= limit:
            raise ValueError(
                f"stage {spec!r} ({name!r}) is the final stage or beyond it: its output feeds the backbone's own head, "
                f"which is already the last exit. Choose an earlier stage:\n{describe(table)}"
            )
        if shapes.get(node) is None or len(shapes[node]) not in (3, 4):
            raise ValueError(
                f"stage {spec!r} ({name!r}) outputs {shapes.get(node)!r}, not a (B, C, H, W), (B, H, W, C) or (B, L, C) feature"
            )

    train_cuts = []
    for name, node in resolved:
        twin = train_traced.by_name(node.name)  # the same node when the graphs agree up to here
        if twin is None or train_traced.paths.get(twin) != eval_traced.paths.get(node):
            twin = train_traced.find(name) if name in module_names else None
        if twin is None:
            raise ValueError(f"stage {name!r} exists in the eval-mode graph but not in the training-mode graph of {type(model).__name__}")
        train_cuts.append(twin)
    train_classifier = classifier_node(model, train_traced)

    final_shape = shapes.get(first_input(classifier)) if classifier is not None else None
    pre_logits_ok = final_shape is not None and len(final_shape) == 2
    final_channels = final_shape[1] if pre_logits_ok else final.channels if final else 0
    sites = []
    for name, node in resolved:
        row = next((s for s in table if s.name == name), None)
        # a refused row's width is not this node's
        layout, channels, reduction = read_feature(shapes[node], row.channels if row and row.usable else None, model, size[1:])
        sites.append(
            ExitSite(
                stage=name,
                channels=channels,
                layout=layout,
                shape=shapes[node],
                reduction=reduction,
                final_channels=int(final_channels),
                final_reduction=final.reduction if final else None,
                replicate=functools.partial(_replicate, model, eval_traced, shapes, last_use, table, node),
            )
        )
    eval_pre = first_input(classifier) if pre_logits_ok else None
    train_pre = first_input(train_classifier) if pre_logits_ok and train_classifier is not None else None
    return ExitPlan(
        eval_segments=split(eval_traced, [n for _, n in resolved], eval_pre),
        train_segments=split(train_traced, train_cuts, train_pre),
        sites=sites,
        stage_names=names,
        num_classes=int(out.shape[1]),
        input_size=size,
        first_layer=first_layer(model, eval_traced),
    )


def _plan_from_intermediates(model: nn.Module, stages, size) -> ExitPlan:
    """The plan for a model fx cannot trace: timm's forward_intermediates gives every exit's feature."""
    infos = [i if isinstance(i, dict) else vars(i) for i in model.feature_info]
    names = [i["module"] for i in infos]
    table = [Stage(k, n, int(i["num_chs"]), i.get("reduction"), "NCHW", final=k == len(infos) - 1)
             for k, (n, i) in enumerate(zip(names, infos))]
    indices = []
    for spec in stages:
        if isinstance(spec, str) and spec in names:
            indices.append(names.index(spec))
        elif isinstance(spec, int) and not isinstance(spec, bool) and -len(names) <= spec < len(names):
            indices.append(spec % len(names))
        else:
            raise ValueError(
                f"stage {spec!r} is not one of this model's feature_info stages (it is run through forward_intermediates, "
                f"so only these work):\n{describe(table)}"
            )
    for a, b in itertools.pairwise(indices):
        if b <= a:
            raise ValueError(f"stages must be distinct and ordered shallow to deep, got {list(stages)!r}")
    if indices[-1] >= len(names) - 1:
        raise ValueError(
            f"stage {stages[-1]!r} is the final stage: its output feeds the backbone's own head, "
            f"which is already the last exit. Choose an earlier stage:\n{describe(table)}"
        )
    x = dummy_input(model, size)
    old = set_training(model, False)
    try:
        with torch.no_grad():
            final, feats = model.forward_intermediates(x, indices=indices, intermediates_only=False)
            logits, pre_logits, reference = model.forward_head(final), model.forward_head(final, pre_logits=True), model(x)
    finally:
        set_training(model, old)
    if not torch.allclose(logits, reference, rtol=1e-4, atol=1e-5):
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}, "
            "and its forward_intermediates + forward_head do not reproduce its forward; it cannot be wrapped"
        )
    sites = [
        ExitSite(stage=names[i], channels=int(f.shape[1]), layout=FeatureLayout("NCHW"), shape=tuple(f.shape), reduction=table[i].reduction,
                 final_channels=int(pre_logits.shape[-1]), final_reduction=table[-1].reduction)
        for i, f in zip(indices, feats)
    ]
    return ExitPlan([], [], sites, [names[i] for i in indices], int(logits.shape[1]), size, feature_indices=indices)


def _shape_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
