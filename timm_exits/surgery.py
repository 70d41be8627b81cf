"""Tracing a classifier with torch.fx, finding its stages, and cutting the graph into segments.

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
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torchvision
from torch import nn

__all__ = ["Stage", "TraceError", "list_stages", "graph_node_names", "plan_exits", "ExitPlan"]

FORMATS = ("NCHW", "NHWC", "NLC")


class TraceError(ValueError):
    """torch.fx could not trace the model; the message names the module where it failed."""


@dataclass(frozen=True)
class Stage:
    """One place an exit can be attached: a row of `list_stages(model)`."""

    index: int
    name: str  # module path (or graph node name) whose output is the stage's output
    channels: int
    reduction: int | None  # input size / feature size; None for token layouts
    layout: str  # "NCHW", "NHWC" or "NLC"
    final: bool = False  # the last stage feeds the backbone's own head and cannot be an exit


@dataclass
class TracedGraph:
    graph: fx.Graph
    paths: dict[fx.Node, str]  # node -> module path it was created in ("" at top level)
    nodes: list[fx.Node] = field(init=False)
    position: dict[fx.Node, int] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}

    def by_name(self, name: str) -> fx.Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def last_node_of_module(self, path: str) -> fx.Node | None:
        prefix = path + "."
        found = None
        for n in self.nodes:
            p = self.paths.get(n, "")
            if n.op in ("call_module", "call_function", "call_method") and (p == path or p.startswith(prefix)):
                found = n
        return found

    def find(self, key: str) -> fx.Node | None:
        """The node that `key` (a module path or a graph node name) denotes."""
        node = self.last_node_of_module(key) if key else None
        return node if node is not None else self.by_name(key)


@dataclass
class ExitSite:
    """What a head needs to know about the feature it reads."""

    stage: str
    channels: int
    layout: "FeatureLayout"
    shape: tuple[int, ...]  # feature shape on the dummy input, batch dim included
    reduction: int | None
    final_channels: int  # width of the backbone's pre-logits features
    final_reduction: int | None
    replicate: Any = None  # () -> (block copies, out channels, out layout), for the `replica` head


@dataclass(frozen=True)
class FeatureLayout:
    """How an exit's feature tensor is laid out and how a head should pool it.

    ``format`` is "NCHW", "NHWC" (e.g. swin) or "NLC" (tokens, e.g. ViT). For tokens,
    ``token_pool`` is "token" (read the class token, index 0) or "avg" (mean of the tokens after
    the ``num_prefix_tokens`` class/register tokens), following the backbone's own pooling.
    """

    format: str
    token_pool: str = "avg"
    num_prefix_tokens: int = 0


@dataclass
class ExitPlan:
    """Everything `wrap()` learned about the backbone: segments' graphs and what each exit reads."""

    eval_segments: list[fx.Graph]
    train_segments: list[fx.Graph]
    sites: list[ExitSite]
    stage_names: list[str]
    num_classes: int
    input_size: tuple[int, ...]
    has_pre_logits: bool
    feature_indices: list[int] | None = None  # set when the model runs through forward_intermediates

    def __deepcopy__(self, memo):
        return self  # never changed after wrap(); copies of a model share it (and its graphs)


# ----------------------------------------------------------------------------------------------
# tracing


def _tracer_settings(extra_leaf_modules: Iterable[type], extra_autowrap: Iterable[Any]):
    """torchvision's defaults (torchvision.ops as leaves, math autowrapped) plus timm's registry.

    timm's own feature extraction passes exactly this union to torchvision's tracer, so timm
    models trace the way timm traces them, and torchvision models the way torchvision does.
    """
    leaves = [obj for _, obj in vars(torchvision.ops).items() if isinstance(obj, type) and issubclass(obj, nn.Module)]
    autowrap: list[Any] = []
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is a dependency, but be kind to very old versions
        timm_fx = None
    if timm_fx is not None:
        leaves += list(getattr(timm_fx, "_leaf_modules", ()))
        autowrap += list(getattr(timm_fx, "_autowrap_functions", ()))
    leaves += list(extra_leaf_modules)
    autowrap += list(extra_autowrap)
    return tuple(leaves), tuple(autowrap)


class _PathTracer(fx.Tracer):
    """fx tracer that records, for every node, the path of the module it was created in."""

    def __init__(self, leaf_types: tuple[type, ...], autowrap_functions: tuple[Any, ...]):
        super().__init__(autowrap_modules=(math, torchvision.ops), autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self.module_path = ""
        self.paths: dict[fx.Node, str] = {}
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        parent = self.module_path
        self.module_path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module is the one that failed
                self.failed_module = self.module_path
            raise
        finally:
            self.module_path = parent

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.paths[node] = target if kind == "call_module" else self.module_path
        return node


def _set_training(model: nn.Module, modes: dict[nn.Module, bool] | bool) -> dict[nn.Module, bool]:
    """Set every submodule's training flag (one bool, or the dict this returned); return the old flags."""
    old = {m: m.training for m in model.modules()}
    for m in model.modules():
        m.training = modes if isinstance(modes, bool) else modes[m]
    return old


def trace(model: nn.Module, training: bool, leaf_modules=(), autowrap_functions=()) -> TracedGraph:
    """Trace `model` in training or eval mode; raise `TraceError` naming the failing module."""
    leaves, autowrap = _tracer_settings(leaf_modules, autowrap_functions)
    tracer = _PathTracer(leaves, autowrap)
    old = _set_training(model, training)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds; all mean the same thing to the user
        where = tracer.failed_module
        if where:
            cls = type(model.get_submodule(where)).__name__
            place = f"module '{where}' ({cls})"
            fix = (
                f"register it as a leaf so fx calls it whole: wrap(model, stages, leaf_modules=[{cls}]) "
                f"or timm.layers.register_notrace_module({cls})"
            )
        else:
            place = f"the top-level forward of {type(model).__name__}"
            fix = "make the data-dependent part a function and pass it as wrap(..., autowrap_functions=[fn])"
        raise TraceError(f"torch.fx could not trace {place}: {type(err).__name__}: {err}. To fix it, {fix}.") from err
    finally:
        _set_training(model, old)
    return TracedGraph(graph, tracer.paths)


# ----------------------------------------------------------------------------------------------
# shapes, liveness and the stage table


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size the backbone expects: its patch embedding's, its config's, or 3x224x224."""
    chans = int(getattr(model, "in_chans", 3) or 3)
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None) or getattr(model, "image_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        return (chans, int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg and chans == cfg["input_size"][0]:
        return tuple(int(v) for v in cfg["input_size"])
    return (chans, 224, 224)


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def run_shapes(model: nn.Module, traced: TracedGraph, x: torch.Tensor):
    """Shapes of every node of the eval graph on `x`, and the graph's output."""
    gm = fx.GraphModule(model, traced.graph)
    recorder = _ShapeRecorder(gm)
    old = _set_training(model, False)
    try:
        with torch.no_grad():
            out = recorder.run(x)
    finally:
        _set_training(model, old)
    return recorder.shapes, out


def _last_use(traced: TracedGraph) -> dict[fx.Node, int]:
    pos = traced.position
    return {n: max((pos[u] for u in n.users), default=-1) for n in traced.nodes}


def live_after(traced: TracedGraph, p: int, last_use: dict[fx.Node, int]) -> list[fx.Node]:
    """Values computed at or before position `p` that a later node still reads (get_attr excluded)."""
    return [n for n in traced.nodes[: p + 1] if n.op != "get_attr" and last_use[n] > p]


def _single_cuts(traced: TracedGraph, last_use: dict[fx.Node, int]) -> list[fx.Node]:
    """Nodes after which the only value still needed is the node itself (a clean stage boundary)."""
    delta = [0] * (len(traced.nodes) + 1)
    for n, i in traced.position.items():
        if n.op != "get_attr" and last_use[n] > i:
            delta[i] += 1
            delta[last_use[n]] -= 1
    cuts, live = [], 0
    for n in traced.nodes:
        i = traced.position[n]
        live += delta[i]
        if live == 1 and n.op not in ("placeholder", "get_attr", "output") and last_use[n] > i:
            cuts.append(n)
    return cuts


def feature_layout(shape: tuple[int, ...], channels: int | None, model: nn.Module) -> FeatureLayout:
    """Guess how a feature of `shape` is laid out, using the channel count when it is known."""
    if len(shape) == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        has_cls = getattr(model, "cls_token", None) is not None or getattr(model, "class_token", None) is not None
        if not prefix and has_cls:
            prefix = 1
        pool = getattr(model, "global_pool", "token")
        token = prefix > 0 and (pool in ("token", "map", None) or not isinstance(pool, str))
        return FeatureLayout("NLC", "token" if token else "avg", prefix)
    if len(shape) != 4:
        return FeatureLayout("NC")
    if channels is not None and shape[1] != channels and shape[3] == channels:
        return FeatureLayout("NHWC")
    if channels is None and shape[1] == shape[2] and shape[3] != shape[1]:
        return FeatureLayout("NHWC")  # square input: the two equal dims are the spatial ones
    return FeatureLayout("NCHW")


def _spatial(shape: tuple[int, ...], layout: FeatureLayout) -> tuple[int, int] | None:
    if layout.format == "NCHW":
        return shape[2], shape[3]
    if layout.format == "NHWC":
        return shape[1], shape[2]
    return None


def _outermost_module(traced: TracedGraph, node: fx.Node, module_names: set[str]) -> str:
    """The widest module whose output is `node`: the friendliest name for a cut."""
    path = traced.paths.get(node, "")
    parts = path.split(".") if path else []
    for depth in range(1, len(parts) + 1):
        candidate = ".".join(parts[:depth])
        if candidate in module_names and traced.last_node_of_module(candidate) is node:
            return candidate
    return node.name


def _stages_from_feature_info(model, traced, shapes) -> list[tuple[str, fx.Node, int]]:
    rows = []
    for info in model.feature_info:
        info = info if isinstance(info, dict) else vars(info)
        node = traced.find(info["module"])
        if node is not None and shapes.get(node) is not None:
            rows.append((info["module"], node, int(info["num_chs"])))
    return rows


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _contains(module: str, traced: TracedGraph, node: fx.Node) -> bool:
    p = traced.paths.get(node, "")
    return p == module or p.startswith(module + ".")


def _stages_from_graph(model, traced, shapes, last_use) -> list[tuple[str, fx.Node, int | None]]:
    """Stages of a model without feature_info: the last clean cut at each resolution.

    The graph is split into resolution levels at each node whose spatial size differs from the
    level before (global pools to 1x1 are not levels). A level's stage is its last node after
    which only that node's value is still needed, and which does not sit inside the block that
    starts the next level (torchvision's MobileNet blocks expand before they downsample). A
    model whose features never change resolution (a ViT after its patch embedding) is split at
    the outputs of its longest run of identical blocks instead.
    """
    names = {n for n, _ in model.named_modules()}
    cuts = set(_single_cuts(traced, last_use))
    levels: list[tuple[tuple[int, int], fx.Node]] = []  # (spatial size, first node at that size)
    for n in traced.nodes:  # only the main path: windows and attention maps are 4-D too
        shape = shapes.get(n)
        if n not in cuts or shape is None or len(shape) != 4:
            continue
        hw = _spatial(shape, feature_layout(shape, None, model))
        if hw != (1, 1) and (not levels or levels[-1][0] != hw):
            levels.append((hw, n))
    if len(levels) >= 2:
        rows = []
        for i, (hw, first) in enumerate(levels):
            nxt = levels[i + 1][1] if i + 1 < len(levels) else None
            lo, hi = traced.position[first], traced.position[nxt] if nxt is not None else len(traced.nodes)
            best = None
            for c in traced.nodes[lo:hi]:
                shape = shapes.get(c)
                if c not in cuts or shape is None or len(shape) != 4 or _spatial(shape, feature_layout(shape, None, model)) != hw:
                    continue
                if nxt is not None:
                    shared = set(_ancestors(traced.paths.get(c, ""))) & set(_ancestors(traced.paths.get(nxt, "")))
                    if any(not _contains(m, traced, first) for m in shared):
                        continue  # inside the block that starts the next level
                best = c
            if best is not None:
                rows.append((_outermost_module(traced, best, names), best, None))
        return rows
    best: list[tuple[str, fx.Node, None]] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        children = list(parent.named_children())
        kinds = {type(m) for _, m in children}
        if len(children) < 2 or len(kinds) != 1:
            continue
        rows = []
        for child_name, _ in children:
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            node = traced.last_node_of_module(path)
            if node in cuts:
                rows.append((path, node, None))
        if len(rows) > len(best):
            best = rows
    return best


def _stage_table(model, traced, shapes, last_use, input_hw) -> list[Stage]:
    raw = []
    if getattr(model, "feature_info", None):
        raw = _stages_from_feature_info(model, traced, shapes)
    if not raw:
        raw = _stages_from_graph(model, traced, shapes, last_use)
    raw.sort(key=lambda row: traced.position[row[1]])
    stages = []
    for i, (name, node, chans) in enumerate(raw):
        shape = shapes[node]
        layout = feature_layout(shape, chans, model)
        if chans is None:
            chans = shape[1] if layout.format == "NCHW" else shape[-1]
        hw = _spatial(shape, layout)
        reduction = round(input_hw[0] / hw[0]) if hw else None
        stages.append(Stage(i, name, int(chans), reduction, layout.format, final=i == len(raw) - 1))
    return stages


# ----------------------------------------------------------------------------------------------
# the classifier


def _classifier_node(model: nn.Module, traced: TracedGraph) -> fx.Node | None:
    """The call of the backbone's final classifier layer, whose input is the pre-logits feature."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            clf = get_classifier()
        except Exception:  # some models' get_classifier needs arguments; fall through
            clf = None
        if isinstance(clf, nn.Module) and not isinstance(clf, nn.Identity):
            path = next((n for n, m in model.named_modules() if m is clf), None)
            if path:
                node = traced.last_node_of_module(path)
                if node is not None:
                    return node
    calls = [n for n in traced.nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), (nn.Linear, nn.Conv2d))]
    return calls[-1] if calls else None


def _first_input(node: fx.Node) -> fx.Node | None:
    """The tensor a classifier reads: the first Node among its arguments (through a module's leaves)."""
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
    return None


# ----------------------------------------------------------------------------------------------
# resolving stages


def _describe(stages: Sequence[Stage]) -> str:
    rows = [f"  {s.index}: {s.name!r} ({s.channels} ch" + (f", 1/{s.reduction}" if s.reduction else "") + ")" + (" [final]" if s.final else "") for s in stages]
    return "\n".join(rows)


def _resolve(spec, table: list[Stage], traced: TracedGraph, module_names: set[str]) -> tuple[str, fx.Node]:
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise TypeError(f"each entry of `stages` must be an int (index into the stage table) or a str (module or node name), got {spec!r} of type {type(spec).__name__}")
    if isinstance(spec, int):
        if not -len(table) <= spec < len(table):
            raise ValueError(f"stage index {spec} is out of range: this model has {len(table)} stages (indices 0..{len(table) - 1}, negative counting from the end):\n{_describe(table)}")
        stage = table[spec]
        return stage.name, traced.find(stage.name)
    node = traced.find(spec) if spec in module_names else traced.by_name(spec)
    if node is None:
        known = "\n".join(f"  {s.name!r}" for s in table)
        raise ValueError(
            f"unknown stage {spec!r}: it is neither a module name of the model (see model.named_modules()) "
            f"nor a node of its traced graph (see timm_exits.graph_node_names(model)). The model's stages are:\n{known}"
        )
    return spec, node


def list_stages(model: nn.Module, input_size: Sequence[int] | None = None, leaf_modules=(), autowrap_functions=()) -> list[Stage]:
    """The stages an exit can be attached to, in order; the last one (``final``) feeds the head.

    For a timm model these are its ``feature_info`` entries; for other models (torchvision) they
    are found in the graph, so the same index means the same depth::

        >>> import timm, timm_exits
        >>> [s.name for s in timm_exits.list_stages(timm.create_model("resnet18"))]
        ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    """
    traced = trace(model, False, leaf_modules, autowrap_functions)
    size = _check_input_size(input_size, model)
    x = _dummy_input(model, size)
    shapes, _ = run_shapes(model, traced, x)
    return _stage_table(model, traced, shapes, _last_use(traced), size[1:])


def graph_node_names(model: nn.Module, leaf_modules=(), autowrap_functions=()) -> list[str]:
    """Names of the nodes of the model's traced (eval-mode) graph; any of them can be a stage."""
    traced = trace(model, False, leaf_modules, autowrap_functions)
    return [n.name for n in traced.nodes if n.op not in ("placeholder", "output", "get_attr")]


def _check_input_size(input_size, model) -> tuple[int, ...]:
    if input_size is None:
        return default_input_size(model)
    size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"input_size must be three positive ints (channels, height, width), got {input_size!r}")
    return size


def _dummy_input(model: nn.Module, size: Sequence[int]) -> torch.Tensor:
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else "cpu"
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.randn(1, *size, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# cutting


def split(traced: TracedGraph, cuts: list[fx.Node], pre_logits: fx.Node | None, prefix: str = "backbone.") -> list[fx.Graph]:
    """Cut `traced` after each node of `cuts` into len(cuts) + 1 graphs.

    Segment k computes from cut k-1 to cut k and returns ``(feature_k, carried)``, where
    ``carried`` holds every value a later node still reads. The last segment returns
    ``(backbone output, pre-logits feature or None)``. Module and attribute targets get `prefix`
    so the segments can be bound to a holder whose only child is the backbone.
    """
    last_use = _last_use(traced)
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

        def lookup(n: fx.Node) -> fx.Node:
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
        first = next(c for c in traced.nodes[pos[prev] + 1 : pos[end] + 1] if _closes_block(traced, last_use, prev, c) and shapes.get(c) is not None and shapes[c][1:] == shapes[end][1:])
        region = traced.nodes[pos[prev] + 1 : pos[first] + 1]
        reads = {a for n in region for a in n.all_input_nodes if pos[a] <= pos[prev] and a.op != "get_attr"}
        if reads != {prev}:
            raise ValueError(f"the replica head needs a block that reads only the stage output {prev.name!r}, but it reads {sorted(a.name for a in reads)}")
        piece = fx.Graph()
        env = {prev: piece.placeholder("x")}
        for n in region:
            env[n] = piece.node_copy(n, lambda a: env[a] if a in env else env.setdefault(a, piece.get_attr(a.target)))
        piece.output(env[first])
        blocks.append(copy.deepcopy(fx.GraphModule(model, piece, class_name="ReplicaBlock")))
        layout, channels, prev = FeatureLayout(stage.layout), stage.channels, end
    if not blocks:
        raise ValueError("the replica head needs at least one stage after the exit")
    if layout.format == "NLC":
        layout = feature_layout((1, 2, channels), channels, model)
    return blocks, channels, layout


def _closes_block(traced: TracedGraph, last_use, start: fx.Node, end: fx.Node) -> bool:
    """Whether nothing after `end` reads a value computed strictly between `start` and `end`."""
    pos = traced.position
    return all(last_use[n] <= pos[end] for n in traced.nodes[pos[start] + 1 : pos[end]] if n.op != "get_attr")


def plan_exits(model: nn.Module, stages, input_size=None, leaf_modules=(), autowrap_functions=()) -> ExitPlan:
    """Trace, resolve `stages` and cut: everything `wrap()` needs to build a MultiExitModel."""
    if isinstance(stages, (int, str)):
        stages = [stages]
    if not isinstance(stages, Sequence) or isinstance(stages, (bytes, bytearray)):
        raise TypeError(f"stages must be a list of stage indices or names, got {type(stages).__name__}")
    if len(stages) == 0:
        raise ValueError("stages is empty: give at least one stage to attach an exit to, e.g. stages=[1, 2, 3]; see timm_exits.list_stages(model)")
    if getattr(model, "num_classes", None) == 0:
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes=0); create it with the number of classes, e.g. timm.create_model(name, num_classes=10)")
    size = _check_input_size(input_size, model)
    try:
        eval_traced = trace(model, False, leaf_modules, autowrap_functions)
        train_traced = trace(model, True, leaf_modules, autowrap_functions)
    except TraceError as err:
        if not all(callable(getattr(model, a, None)) for a in ("forward_intermediates", "forward_head")) or not getattr(model, "feature_info", None):
            raise
        warnings.warn(f"{err} Falling back to {type(model).__name__}.forward_intermediates: every exit is computed on every call, so early exits save no compute.", stacklevel=3)
        return _plan_from_intermediates(model, stages, size)
    shapes, out = run_shapes(model, eval_traced, _dummy_input(model, size))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the backbone must return logits of shape (B, num_classes) in eval mode; {type(model).__name__} returned {_shape_of(out)}")
    last_use = _last_use(eval_traced)
    table = _stage_table(model, eval_traced, shapes, last_use, size[1:])
    module_names = {n for n, _ in model.named_modules()}

    resolved = [_resolve(s, table, eval_traced, module_names) for s in stages]
    pos = eval_traced.position
    names = [name for name, _ in resolved]
    for (prev, a), (name, b) in zip(resolved, resolved[1:]):
        if pos[b] <= pos[a]:
            kind = "repeated" if pos[a] == pos[b] else "out of order"
            raise ValueError(f"stages must be distinct and ordered shallow to deep; {name!r} is {kind} after {prev!r} in {list(stages)!r}")
    classifier = _classifier_node(model, eval_traced)
    limit = pos[eval_traced.find(table[-1].name)] if table else (pos[classifier] if classifier is not None else len(pos) - 1)
    for (name, node), spec in zip(resolved, stages):
        if pos[node] >= limit:
            raise ValueError(
                f"stage {spec!r} ({name!r}) is the final stage or beyond it: its output feeds the backbone's own head, "
                f"which is already the last exit. Choose an earlier stage:\n{_describe(table)}"
            )
        if shapes.get(node) is None or len(shapes[node]) not in (3, 4):
            raise ValueError(f"stage {spec!r} ({name!r}) outputs {shapes.get(node)!r}, not a (B, C, H, W), (B, H, W, C) or (B, L, C) feature")

    train_cuts = []
    for name, node in resolved:
        twin = train_traced.find(name) if name in module_names else train_traced.by_name(node.name)
        if twin is None:
            raise ValueError(f"stage {name!r} exists in the eval-mode graph but not in the training-mode graph of {type(model).__name__}")
        train_cuts.append(twin)
    train_classifier = _classifier_node(model, train_traced)

    final_shape = shapes.get(_first_input(classifier)) if classifier is not None else None
    pre_logits_ok = final_shape is not None and len(final_shape) == 2
    final_channels = final_shape[1] if pre_logits_ok else table[-1].channels if table else 0
    sites = []
    for name, node in resolved:
        shape = shapes[node]
        row = next((s for s in table if s.name == name), None)
        layout = feature_layout(shape, row.channels if row else None, model)
        chans = shape[1] if layout.format == "NCHW" else shape[-1]
        hw = _spatial(shape, layout)
        sites.append(
            ExitSite(
                stage=name,
                channels=int(chans),
                layout=layout,
                shape=shape,
                reduction=round(size[1] / hw[0]) if hw else None,
                final_channels=int(final_channels),
                final_reduction=table[-1].reduction if table else None,
                replicate=functools.partial(_replicate, model, eval_traced, shapes, last_use, table, node),
            )
        )
    eval_pre = _first_input(classifier) if pre_logits_ok else None
    train_pre = _first_input(train_classifier) if pre_logits_ok and train_classifier is not None else None
    return ExitPlan(
        eval_segments=split(eval_traced, [n for _, n in resolved], eval_pre),
        train_segments=split(train_traced, train_cuts, train_pre),
        sites=sites,
        stage_names=names,
        num_classes=int(out.shape[1]),
        input_size=size,
        has_pre_logits=pre_logits_ok,
    )


def _plan_from_intermediates(model: nn.Module, stages, size) -> ExitPlan:
    """The plan for a model fx cannot trace: timm's forward_intermediates gives every exit's feature."""
    infos = [i if isinstance(i, dict) else vars(i) for i in model.feature_info]
    names = [i["module"] for i in infos]
    table = [Stage(k, n, int(i["num_chs"]), i.get("reduction"), "NCHW", final=k == len(infos) - 1) for k, (n, i) in enumerate(zip(names, infos))]
    indices = []
    for spec in stages:
        if isinstance(spec, str) and spec in names:
            indices.append(names.index(spec))
        elif isinstance(spec, int) and not isinstance(spec, bool) and -len(names) <= spec < len(names):
            indices.append(spec % len(names))
        else:
            raise ValueError(f"stage {spec!r} is not one of this model's feature_info stages (it is run through forward_intermediates, so only these work):\n{_describe(table)}")
    for a, b in zip(indices, indices[1:]):
        if b <= a:
            raise ValueError(f"stages must be distinct and ordered shallow to deep, got {list(stages)!r}")
    if indices[-1] >= len(names) - 1:
        raise ValueError(f"stage {stages[-1]!r} is the final stage: its output feeds the backbone's own head, which is already the last exit. Choose an earlier stage:\n{_describe(table)}")
    x = _dummy_input(model, size)
    old = _set_training(model, False)
    try:
        with torch.no_grad():
            final, feats = model.forward_intermediates(x, indices=indices, intermediates_only=False)
            logits, pre_logits, reference = model.forward_head(final), model.forward_head(final, pre_logits=True), model(x)
    finally:
        _set_training(model, old)
    if not torch.allclose(logits, reference, rtol=1e-4, atol=1e-5):
        raise TraceError(f"torch.fx could not trace {type(model).__name__}, and its forward_intermediates + forward_head do not reproduce its forward; it cannot be wrapped")
    sites = [
        ExitSite(stage=names[i], channels=int(f.shape[1]), layout=FeatureLayout("NCHW"), shape=tuple(f.shape), reduction=table[i].reduction,
                 final_channels=int(pre_logits.shape[-1]), final_reduction=table[-1].reduction)
        for i, f in zip(indices, feats)
    ]
    return ExitPlan([], [], sites, [names[i] for i in indices], int(logits.shape[1]), size, pre_logits.dim() == 2, feature_indices=indices)


def _shape_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
