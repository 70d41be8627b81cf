"""Tracing a classifier with torch.fx and reading its graph: shapes, liveness, clean cuts.

The backbone is traced with torchvision's defaults plus timm's registry of leaf modules and
autowrapped functions, recording for every node the module it was created in. A node is a
*clean cut* when, after it, the only value still needed is its own.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torchvision
from torch import nn
from torch.fx._symbolic_trace import _assert_is_none

from .inputs import default_input_size, dummy_input
from .modes import set_training

__all__ = ["TraceError", "TraceOptions", "TracedGraph", "trace", "graph_node_names", "run_shapes", "live_after", "single_cuts"]


class TraceError(ValueError):
    """torch.fx could not trace the model; the message names the module where it failed."""


@dataclass
class TracedGraph:
    graph: fx.Graph
    paths: dict[fx.Node, str]  # node -> module path it was created in ("" at top level)
    shapes: dict[fx.Node, tuple[int, ...] | None] | None = None  # set by run_shapes
    nodes: list[fx.Node] = field(init=False)
    position: dict[fx.Node, int] = field(init=False)

    def __post_init__(self) -> None:
        self.nodes = list(self.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}

    def by_name(self, name: str) -> fx.Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def last_node_of_module(self, path: str) -> fx.Node | None:
        """The module's output: its last node, or, when that is no feature map (mvitv2's stages
        return ``(x, size)``), the last 3-D/4-D tensor it computed (known once shapes are run)."""
        prefix = path + "."
        inside = [n for n in self.nodes if n.op in ("call_module", "call_function", "call_method")
                  and (self.paths.get(n, "") in (path,) or self.paths.get(n, "").startswith(prefix))]
        if not inside:
            return None
        if self.shapes is not None and not _is_feature(self.shapes.get(inside[-1])):
            return next((n for n in reversed(inside) if _is_feature(self.shapes.get(n))), inside[-1])
        return inside[-1]

    def find(self, key: str) -> fx.Node | None:
        """The node that `key` (a module path or a graph node name) denotes."""
        node = self.last_node_of_module(key) if key else None
        return node if node is not None else self.by_name(key)


def _is_feature(shape) -> bool:
    return shape is not None and len(shape) in (3, 4)


@dataclass(frozen=True)
class TraceOptions:
    """What fx should not trace into, beyond torchvision's and timm's defaults: one value for every tracing call.

    ``leaf_modules`` are module types called whole; ``autowrap_functions`` functions recorded as
    one call. `leaves` and `autowrap` merge them with the defaults, in this one place.
    """

    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple[Any, ...] = ()

    @classmethod
    def of(cls, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Any] = ()) -> TraceOptions:
        """Checked: a list of module classes, and a list of functions."""
        if isinstance(leaf_modules, (type, nn.Module)):
            raise TypeError(
                f"leaf_modules must be a list of module classes, e.g. leaf_modules=[{_class_name(leaf_modules)}], got {leaf_modules!r}"
            )
        leaves = tuple(leaf_modules)
        for leaf in leaves:
            if isinstance(leaf, nn.Module):
                raise TypeError(f"leaf_modules takes module classes, not instances: pass {type(leaf).__name__}, not {leaf!r}")
            if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise TypeError(f"leaf_modules must hold nn.Module subclasses, got {leaf!r}")
        if callable(autowrap_functions):
            raise TypeError(
                f"autowrap_functions must be a list of functions, e.g. autowrap_functions=[{getattr(autowrap_functions, '__name__', 'fn')}]"
            )
        functions = tuple(autowrap_functions)
        for fn in functions:
            if not callable(fn):
                raise TypeError(f"autowrap_functions must hold functions, got {fn!r}")
        return cls(leaves, functions)

    def merged(self) -> tuple[tuple[type, ...], tuple[Any, ...]]:
        """torchvision's defaults (torchvision.ops as leaves, math autowrapped) plus timm's registry plus these.

        timm's own feature extraction passes exactly this union to torchvision's tracer, so timm
        models trace the way timm traces them, and torchvision models the way torchvision does.
        """
        leaves = [obj for _, obj in vars(torchvision.ops).items() if isinstance(obj, type) and issubclass(obj, nn.Module)]
        autowrap: list[Any] = []
        # timm keeps its registry in timm.layers._fx from 1.0.17, in timm.models._features_fx before
        for registry in ("timm.layers._fx", "timm.models._features_fx"):
            try:
                timm_fx = importlib.import_module(registry)
            except ImportError:
                continue
            leaves += [m for m in getattr(timm_fx, "_leaf_modules", ()) if m not in leaves]
            autowrap += [f for f in getattr(timm_fx, "_autowrap_functions", ()) if f not in autowrap]
        return tuple(leaves + list(self.leaf_modules)), tuple(autowrap + list(self.autowrap_functions))


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
        if kind == "call_function" and target is torch._assert:
            target, args = self._assert_with_values(args)
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.paths[node] = target if kind == "call_module" else self.module_path
        return node


    def _assert_with_values(self, args: tuple) -> tuple[Any, tuple]:
        """``torch._assert(cond, f"... {h} ...")`` traced bakes ``Proxy(getitem_2)`` into the message; format it at run time instead."""
        message = args[1] if len(args) == 2 else None
        names = re.findall(r"Proxy\((\w+)\)", message) if isinstance(message, str) else []
        nodes = {n.name: n for n in self.graph.nodes}
        if not names or not all(n in nodes for n in names):
            return torch._assert, args
        template = re.sub(r"Proxy\(\w+\)", "{}", message.replace("{", "{{").replace("}", "}}"))
        return assert_formatted, (args[0], template, *(nodes[n] for n in names))


def assert_formatted(condition, template: str, *values) -> None:
    """`torch._assert` whose message is formatted with the values the check read (a traced shape check)."""
    if isinstance(condition, fx.Proxy):  # a segment traced again (unpickling does so): stay one node
        return condition.tracer.create_proxy("call_function", assert_formatted, (condition, template, *values), {})
    if not condition:
        raise AssertionError(template.format(*values))


def _class_name(obj) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def _drop_proxies(model: nn.Module) -> None:
    """Remove fx Proxies that tracing left in modules' caches (efficientformer's attention biases).

    Tracing runs the real forward, so a module that memoises a value in a dict stores a Proxy
    there; left in place it would break the user's own forward and the next trace.
    """
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, dict) and value:
                for key in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                    del value[key]


def _optional_arguments(model: nn.Module) -> dict[str, Any] | None:
    """forward's optional arguments at their defaults: wrap() only ever calls forward(x).

    Left symbolic, ``mask=None`` becomes a placeholder and ``if mask is not None`` is taken
    (timm's hiera).
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty} or None


def trace(model: nn.Module, training: bool, options: TraceOptions = TraceOptions()) -> TracedGraph:
    """Trace `model` in training or eval mode; raise `TraceError` naming the failing module."""
    leaves, autowrap = options.merged()
    tracer = _PathTracer(leaves, autowrap)
    old = set_training(model, training)
    try:
        graph = tracer.trace(model, concrete_args=_optional_arguments(model))
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
        _drop_proxies(model)
        set_training(model, old)
    _drop_none_checks(graph, tracer.paths)
    return TracedGraph(graph, tracer.paths)


def _drop_none_checks(graph: fx.Graph, paths: dict[fx.Node, str]) -> None:
    """Remove fx's checks that an optional argument left at None is None: wrap() never passes one.

    fx emits ``wrap("torch.fx._symbolic_trace._assert_is_none")`` in the segment's code for them;
    run again when the segment is unpickled or copied, that line registers a name no module has,
    and every later fx trace in the process fails with a KeyError (a ViT, whose forward takes
    ``attn_mask=None``, did this).
    """
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is _assert_is_none]:
        graph.erase_node(node)
        paths.pop(node, None)


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        # fx's value garbage collection loses values on some timm graphs (efficientformer's
        # cached attention biases); one dummy forward can afford to keep them all
        super().__init__(gm, garbage_collect_values=False)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``, to quote an error inside one of ours."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def shapes_at(model: nn.Module, traced: TracedGraph, size, given: bool = True) -> tuple:
    """`run_shapes` on a dummy input of `size`; where the caller gave that size (`given`) and it is not the
    model's own, a failure is named as the size's (at its own size the failure is the model's: it stands)."""
    try:
        return run_shapes(model, traced, dummy_input(model, size))
    except Exception as err:  # a conv's channel check, a ViT's size assertion: say which argument to change
        if not given or tuple(size) == tuple(default_input_size(model)):
            raise
        raise ValueError(
            f"{type(model).__name__} cannot run on a dummy input of input_size={tuple(size)}: {error_line(err)}; "
            "give input_size as the (channels, height, width) the model takes"
        ) from err


def run_shapes(model: nn.Module, traced: TracedGraph, x: torch.Tensor):
    """Shapes of every node of the eval graph on `x`, and the graph's output."""
    gm = fx.GraphModule(model, traced.graph)
    recorder = _ShapeRecorder(gm)
    old = set_training(model, False)
    try:
        with torch.no_grad():
            out = recorder.run(x)
    finally:
        set_training(model, old)
    traced.shapes = recorder.shapes
    return recorder.shapes, out


def last_uses(traced: TracedGraph) -> dict[fx.Node, int]:
    pos = traced.position
    return {n: max((pos[u] for u in n.users), default=-1) for n in traced.nodes}


def live_after(traced: TracedGraph, p: int, last_use: dict[fx.Node, int]) -> list[fx.Node]:
    """Values computed at or before position `p` that a later node still reads (get_attr excluded)."""
    return [n for n in traced.nodes[: p + 1] if n.op != "get_attr" and last_use[n] > p]


def single_cuts(traced: TracedGraph, last_use: dict[fx.Node, int]) -> list[fx.Node]:
    """Nodes after which the only tensor still needed is the node itself (a clean stage boundary).

    Once shapes are known, plain Python values (sizes that mvitv2 carries from stage to stage)
    do not count: they are carried cheaply and say nothing about the feature path.
    """
    delta = [0] * (len(traced.nodes) + 1)
    for n, i in traced.position.items():
        counts = traced.shapes is None or traced.shapes.get(n) is not None
        if n.op != "get_attr" and last_use[n] > i and counts:
            delta[i] += 1
            delta[last_use[n]] -= 1
    cuts, live = [], 0
    for n in traced.nodes:
        i = traced.position[n]
        live += delta[i]
        if live == 1 and n.op not in ("placeholder", "get_attr", "output") and last_use[n] > i:
            cuts.append(n)
    return cuts


def closes_block(traced: TracedGraph, last_use, start: fx.Node, end: fx.Node) -> bool:
    """Whether nothing after `end` reads a value computed strictly between `start` and `end`."""
    pos = traced.position
    return all(last_use[n] <= pos[end] for n in traced.nodes[pos[start] + 1 : pos[end]] if n.op != "get_attr")


def graph_node_names(model: nn.Module, leaf_modules=(), autowrap_functions=()) -> list[str]:
    """Names of the nodes of the model's traced (eval-mode) graph; any of them can be a stage."""
    traced = trace(model, False, TraceOptions.of(leaf_modules, autowrap_functions))
    return [n.name for n in traced.nodes if n.op not in ("placeholder", "output", "get_attr")]
