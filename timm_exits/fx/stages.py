"""The stage table of a backbone: where exits can go, and how each feature is laid out.

timm models list their stages in ``feature_info``. Other models (torchvision) get theirs from
the graph: the last clean cut at each resolution, or the blocks of a transformer, so that the
same index means the same depth in both libraries.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .inputs import check_input_size, default_input_size, dummy_input
from .tracing import (
    TracedGraph,
    TraceError,
    TraceOptions,
    last_uses,
    run_shapes,
    shapes_at,
    single_cuts,
    trace,
)

__all__ = ["Stage", "FeatureLayout", "feature_layout", "read_feature", "list_stages", "stage_table", "candidate_stages"]


@dataclass(frozen=True)
class Stage:
    """One place an exit can be attached: a row of `list_stages(model)`."""

    index: int
    name: str  # module path (or graph node name) whose output is the stage's output
    channels: int
    reduction: int | None  # input size / feature size; None for token layouts
    layout: str  # "NCHW", "NHWC" or "NLC" ("" when `reason` says it has no feature)
    final: bool = False  # the last stage feeds the backbone's own head and cannot be an exit
    reason: str | None = None  # why no exit can go here (the row keeps its index: timm's feature_info index)

    @property
    def usable(self) -> bool:
        return self.reason is None


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


def spatial(shape: tuple[int, ...], layout: FeatureLayout) -> tuple[int, int] | None:
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


def _stages_from_feature_info(model, traced, shapes, input_hw) -> list[tuple]:
    """One row per ``feature_info`` entry, so that index i is ``feature_info[i]`` as in timm; a row whose
    output is not a cut of the classifier's graph says why (its node is None)."""
    rows, seen = [], {}
    modules = {name for name, _ in model.named_modules()}
    for i, info in enumerate(model.feature_info):
        info = info if isinstance(info, dict) else vars(info)
        name, chans = info["module"], int(info["num_chs"])
        node = traced.find(name)
        if node is None and name not in modules:
            rows.append((name, None, chans, f"the classifier has no module {name!r} (feature_info names timm's features_only model); "
                         "cut the classifier after one of its own modules by name"))
        elif node is None:
            rows.append((name, None, chans,
                         f"{name!r} is not computed by the classifier's forward (it belongs to timm's features_only model)"))
        elif shapes.get(node) is None:
            rows.append((name, None, chans, f"{name!r} outputs no single feature tensor"))
        # hrnet: its stage modules output branches, feature_info their merge
        elif (found := read_feature(shapes[node], chans, model, input_hw)[1]) != chans:
            rows.append((name, None, chans,
                         f"the classifier's {name!r} ends in a {found}-channel tensor, not the {chans}-channel feature feature_info[{i}] "
                         "describes (timm's features_only model takes that one elsewhere); "
                         "cut the classifier after one of its own modules by name"))
        elif node in seen:  # coat lists one module several times (one per scale it emits): one cut
            rows.append((name, None, chans, f"it is the same cut as stage {seen[node]}"))
        else:
            rows.append((name, node, chans, None))
            seen[node] = i
    return rows


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _contains(module: str, traced: TracedGraph, node: fx.Node) -> bool:
    p = traced.paths.get(node, "")
    return p == module or p.startswith(module + ".")


def _stages_from_graph(model, traced, shapes, last_use) -> list[tuple[str, fx.Node, int | None]]:
    """Stages of a model without feature_info: the last clean cut at each resolution.

    The graph is split into resolution levels at each node whose spatial size (for token
    models whose token count drops, like mvitv2: token count) differs from the level before
    (global pools to 1x1 are not levels). A level's stage is its last node after
    which only that node's value is still needed, and which does not sit inside the block that
    starts the next level (torchvision's MobileNet blocks expand before they downsample). A
    model whose features never change resolution (a ViT after its patch embedding) is split at
    the outputs of its longest run of identical blocks instead.
    """
    names = {n for n, _ in model.named_modules()}
    cuts = set(single_cuts(traced, last_use))

    def size(shape) -> tuple[int, ...] | None:
        """Spatial size of a 4-D feature, token count of a 3-D one."""
        if shape is None or len(shape) not in (3, 4):
            return None
        return (shape[1],) if len(shape) == 3 else spatial(shape, feature_layout(shape, None, model))

    for ndim in (4, 3):  # maps first; tokens when their count drops (mvitv2), not for a ViT
        levels: list[tuple[tuple[int, ...], fx.Node]] = []  # (size, first node at that size)
        for n in traced.nodes:  # only the main path: windows and attention maps are 4-D too
            shape = shapes.get(n)
            if n not in cuts or shape is None or len(shape) != ndim:
                continue
            hw = size(shape)
            if hw not in ((1, 1), (1,)) and (not levels or levels[-1][0] != hw):
                levels.append((hw, n))
        shrinking = all(b[0] < a[0] for a, b in itertools.pairwise(levels))  # a ViT's reshapes are not stages
        if len(levels) >= 2 and (ndim == 4 or shrinking):
            break
    else:
        levels = []
    if len(levels) >= 2:
        rows = []
        for i, (hw, first) in enumerate(levels):
            nxt = levels[i + 1][1] if i + 1 < len(levels) else None
            lo, hi = traced.position[first], traced.position[nxt] if nxt is not None else len(traced.nodes)
            best = None
            for c in traced.nodes[lo:hi]:
                shape = shapes.get(c)
                if c not in cuts or shape is None or len(shape) != ndim or size(shape) != hw:
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


def stage_table(model, traced, shapes, last_use, input_hw, found_at=None) -> list[Stage]:
    """The model's stages: its ``feature_info`` when it has one, else found in the graph.

    ``found_at``: the shapes to find graph stages with (the model's own input size), so that an
    index means the same stage whatever size the exits are wrapped for (at 32x32, resnet's
    layer4 is 1x1 and would not look like a stage).
    """
    raw = []
    if getattr(model, "feature_info", None):
        raw = _stages_from_feature_info(model, traced, shapes, input_hw)
    if not any(row[1] is not None or traced.find(row[0]) is not None for row in raw):  # no feature_info name is in the classifier's graph
        raw = sorted(((*row, None) for row in _stages_from_graph(model, traced, found_at or shapes, last_use)),
                     key=lambda row: traced.position[row[1]])
    last = max((i for i, row in enumerate(raw) if row[1] is not None), default=-1)
    stages = []
    for i, (name, node, chans, reason) in enumerate(raw):
        if node is None:
            stages.append(Stage(i, name, chans, None, "", reason=reason))
            continue
        layout, channels, reduction = read_feature(shapes[node], chans, model, input_hw)
        stages.append(Stage(i, name, chans if chans is not None else channels, reduction, layout.format, final=i == last))
    return stages


def final_stage(table: Sequence[Stage]) -> Stage | None:
    """The stage that feeds the backbone's own head (None where no row of the table can take an exit)."""
    return next((s for s in table if s.final), None)


def read_feature(shape: tuple[int, ...], channels: int | None, model: nn.Module, input_hw) -> tuple[FeatureLayout, int, int | None]:
    """A feature's layout, channel count (from its shape) and reduction against the input size."""
    layout = feature_layout(shape, channels, model)
    hw = spatial(shape, layout)
    return layout, int(shape[1] if layout.format == "NCHW" else shape[-1]), round(input_hw[0] / hw[0]) if hw else None


def describe(stages: Sequence[Stage]) -> str:
    rows = [
        f"  {s.index}: {s.name!r} "
        + (f"(no exit: {s.reason})" if s.reason else f"({s.channels} ch" + (f", 1/{s.reduction}" if s.reduction else "") + ")")
        + (" [final]" if s.final else "")
        for s in stages
    ]
    return "\n".join(rows)


def list_stages(model: nn.Module, input_size: Sequence[int] | None = None, leaf_modules=(), autowrap_functions=()) -> list[Stage]:
    """The stages an exit can be attached to, in order; the last one (``final``) feeds the head.

    For a timm model these are its ``feature_info`` entries; for other models (torchvision) they
    are found in the graph, so the same index means the same depth::

        >>> import timm, timm_exits
        >>> [s.name for s in timm_exits.list_stages(timm.create_model("resnet18"))]
        ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    """
    if not isinstance(model, nn.Module):
        hint = f"; build it first, e.g. timm.create_model({model!r})" if isinstance(model, str) else ""
        raise TypeError(f"list_stages takes a model (an nn.Module), got {type(model).__name__}{hint}")
    if hasattr(model, "exits") and hasattr(model, "backbone") and hasattr(model, "steps"):  # a MultiExitModel (not imported here)
        raise TypeError(
            f"list_stages takes the backbone: this model is already wrapped (stages {model.stages}); call list_stages(model.backbone)"
        )
    traced, shapes, size = _traced_with_shapes(model, input_size, TraceOptions.of(leaf_modules, autowrap_functions))
    return stage_table(model, traced, shapes, last_uses(traced), size[1:], own_size_shapes(model, traced, size, shapes))


def _traced_with_shapes(model: nn.Module, input_size, options: TraceOptions):
    traced = trace(model, False, options)
    size = check_input_size(input_size, model)
    shapes, _ = shapes_at(model, traced, size, given=input_size is not None)
    return traced, shapes, size


def own_size_shapes(model: nn.Module, traced: TracedGraph, size, shapes):
    """The graph's shapes at the model's own input size (to find stages with), or None to use `shapes`.

    Only for models without ``feature_info``; a model that cannot run at its own size keeps `shapes`.
    """
    own = default_input_size(model)
    if getattr(model, "feature_info", None) or tuple(own) == tuple(size):
        return None
    try:
        found, _ = run_shapes(model, traced, dummy_input(model, own))
    except Exception:  # noqa: BLE001 - a model built for one size only: the stages are found at that size
        found = None
    traced.shapes = shapes  # run_shapes records its shapes on the graph; put the wrapped size's back
    return found


def candidate_stages(model: nn.Module, candidates: str, input_size=None, options: TraceOptions = TraceOptions()) -> list[str]:
    """Where a placement rule may put exits: the stage table's early stages (``"stages"``), or every
    clean cut between blocks before the final stage whose output is a feature map (``"blocks"``).

    A model fx cannot trace (wrapped through ``forward_intermediates``) offers its
    ``feature_info`` stages.
    """
    try:
        traced, shapes, size = _traced_with_shapes(model, input_size, options)
    except TraceError:
        if candidates == "stages" and getattr(model, "feature_info", None):  # wrap() falls back to forward_intermediates
            return [(i if isinstance(i, dict) else vars(i))["module"] for i in model.feature_info][:-1]
        raise
    last = last_uses(traced)
    table = stage_table(model, traced, shapes, last, size[1:], own_size_shapes(model, traced, size, shapes))
    if candidates == "stages":
        return [s.name for s in table if s.usable and not s.final]
    final = final_stage(table)
    cuts = single_cuts(traced, last)
    if final is not None:
        limit = traced.position[traced.find(final.name)]
    else:  # no row of the table takes an exit (hrnet): the head reads the last feature map
        limit = max((traced.position[n] for n in cuts if shapes.get(n) is not None and len(shapes[n]) in (3, 4)),
                    default=len(traced.position))
    modules = {n for n, _ in model.named_modules()}
    names: list[str] = []
    for node in cuts:
        shape = shapes.get(node)
        name = _outermost_module(traced, node, modules)
        if traced.position[node] < limit and shape is not None and len(shape) in (3, 4) and name in modules and name not in names:
            names.append(name)
    return names
