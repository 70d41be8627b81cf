"""The backbone's own classifier, read from the traced graph: the layer whose input is the pre-logits
feature, the check that there is one, and the layer that reads the model's input."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from .tracing import TracedGraph


def classifier_module(model: nn.Module):
    """timm's ``get_classifier()``, or None where the model has none (or one that needs arguments)."""
    get_classifier = getattr(model, "get_classifier", None)
    try:
        return get_classifier() if callable(get_classifier) else None
    except Exception:  # noqa: BLE001 - some models' get_classifier needs arguments
        return None


def classifier_node(model: nn.Module, traced: TracedGraph) -> fx.Node | None:
    """The call of the backbone's final classifier layer, whose input is the pre-logits feature."""
    clf = classifier_module(model)
    if isinstance(clf, nn.Module) and not isinstance(clf, nn.Identity):
        path = next((n for n, m in model.named_modules() if m is clf), None)
        if path:
            node = traced.last_node_of_module(path)
            if node is not None:
                return node
    calls = [n for n in traced.nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), (nn.Linear, nn.Conv2d))]
    return calls[-1] if calls else None


_CLASSIFIER_NAMES = ("fc", "classifier", "head", "heads", "last_linear")


def check_classifier(model: nn.Module) -> None:
    """Refuse a backbone whose classifier was removed: it returns its features, which would pass for logits."""
    fix = "create it with the number of classes, e.g. timm.create_model(name, num_classes=10) or torchvision's resnet18(num_classes=10)"
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes <= 0:
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes={num_classes}); {fix}")
    classifier = classifier_module(model)
    where = "get_classifier()" if isinstance(classifier, nn.Identity) else None
    if where is None and classifier is None:
        where = next((f"model.{name}" for name in _CLASSIFIER_NAMES if isinstance(getattr(model, name, None), nn.Identity)), None)
    if where is not None:
        raise ValueError(
            f"{type(model).__name__} has no classifier ({where} is an nn.Identity): it returns its features, not logits; {fix}"
        )


def first_layer(model: nn.Module, traced: TracedGraph) -> tuple[str, int] | None:
    """The convolution that reads the input itself, and how many channels it expects (None if no layer does)."""
    x = next(n for n in traced.nodes if n.op == "placeholder")
    for n in x.users:
        if n.op == "call_module" and n.args and n.args[0] is x:
            layer = model.get_submodule(n.target)
            if isinstance(layer, nn.modules.conv._ConvNd):
                return n.target, int(layer.in_channels)
    return None


def first_input(node: fx.Node) -> fx.Node | None:
    """The tensor a classifier reads: the first Node among its call's arguments."""
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
    return None
