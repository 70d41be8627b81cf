"""MultiExitModel: the backbone's graph cut into segments, an exit head after each cut."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from .heads import create_head
from .surgery import ExitPlan, plan_exits

__all__ = ["MultiExitModel", "ExitOutputs", "wrap"]

EVAL_OUTPUTS = ("all", "final", "ensemble")


class ExitOutputs(NamedTuple):
    """Per-exit logits and pooled features, shallow to deep (the last is the backbone's head)."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor]


def _bind(graph: fx.Graph, backbone: nn.Module) -> fx.GraphModule:
    """A GraphModule for `graph` whose only child is the live backbone.

    The segment's code reads ``self.backbone.<path>`` at every call, so it always sees the
    backbone's current modules, parameters and buffers (after ``.to()``, ``load_state_dict``,
    ``deepcopy``), and owns nothing itself.
    """
    holder = nn.Module()
    holder.backbone = backbone
    gm = fx.GraphModule(holder, graph, class_name="Segment")
    gm.backbone = backbone  # replace the partial copy of the hierarchy fx made by the real one
    return gm


class MultiExitModel(nn.Module):
    """A backbone with exit heads; ``model(x)`` returns one ``(B, num_classes)`` logits per exit.

    Build it with `timm_exits.wrap`. Exits are ordered shallow to deep; the last one is the
    backbone's own classifier, so in eval mode ``model(x)[-1]`` equals ``model.backbone(x)``.
    ``model.backbone`` is the original module (a plain checkpoint loads into it) and
    ``model.exits`` holds the heads; the segments that run the backbone piece by piece hold no
    parameters of their own.

    Args (of ``forward``):
        x: the input batch, as the backbone takes it.
        return_features: also return each exit's pooled feature (the last exit's is the
            backbone's pre-logits feature), as an `ExitOutputs`.

    In eval mode, ``eval_output="final"`` or ``"ensemble"`` (mean of the exits' logits) makes
    ``forward`` return one tensor, for code that expects a plain classifier (timm's validate).
    """

    def __init__(self, backbone: nn.Module, plan: ExitPlan, exits: nn.ModuleList, eval_output: str = "all"):
        super().__init__()
        if eval_output not in EVAL_OUTPUTS:
            raise ValueError(f"eval_output must be one of {EVAL_OUTPUTS}, got {eval_output!r}")
        self.backbone = backbone
        self.exits = exits
        self.eval_output = eval_output
        self.stages = list(plan.stage_names)
        self.input_size = plan.input_size
        self.grad_checkpointing = False
        self._plan = plan
        self._bound: tuple | None = None
        self._bind()

    # -- segments ---------------------------------------------------------------------------------

    def _bind(self) -> None:
        if self._plan.feature_indices is not None:
            self._bound = (self.backbone, [], [])
            return
        eval_gms = [_bind(g, self.backbone) for g in self._plan.eval_segments]
        code = [[g.python_code("self").src for g in gs] for gs in (self._plan.train_segments, self._plan.eval_segments)]
        # most models trace alike in both modes: then one set of segments serves both
        train_gms = eval_gms if code[0] == code[1] else [_bind(g, self.backbone) for g in self._plan.train_segments]
        self._bound = (self.backbone, train_gms, eval_gms)

    def segments(self) -> list[fx.GraphModule]:
        """The backbone cut at the exits: segment k runs from exit k-1 to exit k (for the current mode)."""
        if self._bound is None or self._bound[0] is not self.backbone:
            self._bind()
        return self._bound[1] if self.training else self._bound[2]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_bound"] = None  # GraphModules are rebuilt against the copied backbone
        state.pop("_carried_kinds", None)  # caches of early_exit, rebuilt on demand
        state.pop("_spent_flops", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._bind()

    # -- forward ----------------------------------------------------------------------------------

    @property
    def num_exits(self) -> int:
        return len(self.exits) + 1

    def _run(self, segment: fx.GraphModule, state: tuple):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(segment, *state, use_reentrant=False)
        return segment(*state)

    def _features_and_final(self, x: torch.Tensor):
        """Each exit's backbone feature, then the backbone's logits and pre-logits feature."""
        if self._plan.feature_indices is not None:  # fx could not trace it: timm's own API
            final, feats = self.backbone.forward_intermediates(x, indices=self._plan.feature_indices, intermediates_only=False)
            yield from feats
            yield self.backbone.forward_head(final), self.backbone.forward_head(final, pre_logits=True)
            return
        segments = self.segments()
        state: tuple = (x,)
        for segment in segments[:-1]:
            feature, state = self._run(segment, state)
            yield feature
        yield self._run(segments[-1], state)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        outputs = self.forward_exits(x, return_features)
        if not return_features and not self.training and self.eval_output != "all":
            return outputs[-1] if self.eval_output == "final" else torch.stack(outputs).mean(0)
        return outputs

    def forward_exits(self, x: torch.Tensor, return_features: bool = False):
        """Every exit's logits (and features), in eval mode too, whatever ``eval_output`` says."""
        steps = self._features_and_final(x)
        logits, features = [], []
        for head, feature in zip(self.exits, steps):  # exits first: zip must not pull the final step
            if return_features:
                z, f = head(feature, return_features=True)
                features.append(f)
            else:
                z = head(feature)
            logits.append(z)
        out, pre_logits = next(steps)
        # auxiliary outputs some backbones add in training (inception's aux logits): keep the main one
        logits.append(out if isinstance(out, torch.Tensor) else out[0])
        if return_features:
            if pre_logits is None:
                raise ValueError(f"return_features=True needs the input of {type(self.backbone).__name__}'s classifier, which wrap() could not find in its graph")
            features.append(pre_logits)
            return ExitOutputs(logits, features)
        return logits

    # -- what trainers ask a timm model for --------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self._plan.num_classes

    @property
    def pretrained_cfg(self):
        return getattr(self.backbone, "pretrained_cfg", None)

    @property
    def default_cfg(self):
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", None)
        names = inner() if callable(inner) else set()
        return {f"backbone.{n}" for n in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's parameter groups (for layer-wise lr decay), re-rooted under ``backbone.``.

        Exit heads match no group, so timm's grouping puts them with the last (head) group.
        """
        inner = getattr(self.backbone, "group_matcher", None)
        if not callable(inner):
            raise AttributeError(f"{type(self.backbone).__name__} has no group_matcher")

        def reroot(pattern):
            if isinstance(pattern, str):
                return r"^backbone\.(?:" + pattern.lstrip("^") + ")"
            # a list of patterns, or of (pattern, ordinal) pairs
            return [(reroot(p[0]), *p[1:]) if isinstance(p, (list, tuple)) else reroot(p) for p in pattern]

        return {k: reroot(v) for k, v in inner(coarse=coarse).items()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each segment in the backward pass instead of storing its activations.

        The backbone's own switch is baked into the traced graph at ``wrap()`` time, so the
        wrapper checkpoints at segment granularity: only the values carried between exits stay.
        """
        self.grad_checkpointing = bool(enable)
        inner = getattr(self.backbone, "set_grad_checkpointing", None)
        if callable(inner):
            inner(enable)

    @torch.no_grad()
    def early_exit(self, x: torch.Tensor, threshold=0.9, criterion="max_prob", ensemble: bool = False):
        """Classify `x`, each sample stopping at its first confident exit; see `timm_exits.early_exit`."""
        from .inference import early_exit

        return early_exit(self, x, threshold, criterion, ensemble)

    # -- checkpoints ------------------------------------------------------------------------------

    def unwrap(self) -> nn.Module:
        """The plain backbone, with whatever weights training gave it (the same module, not a copy).

        Wrapping never changed it, so it runs, saves and exports as the original model does;
        ``copy.deepcopy(model.unwrap())`` for one that no longer shares weights with the wrapper.
        """
        return self.backbone

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, with an error that says how a strict mismatch came about.

        A checkpoint of the backbone alone (a timm checkpoint) belongs in ``model.backbone``; one
        of a model wrapped at other stages or with other heads differs under ``exits.``.
        """
        if strict:
            check_state_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"stages={self.stages}, num_exits={self.num_exits}, eval_output={self.eval_output!r}"


def _listed(keys: set[str], limit: int = 8) -> str:
    names = sorted(keys)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_keys(model: MultiExitModel, state_dict) -> None:
    """Raise a RuntimeError naming the keys in which `state_dict` and `model` differ, and the likely cause."""
    own = set(model.state_dict().keys())
    given = set(state_dict.keys())
    missing, unexpected = own - given, given - own
    if not missing and not unexpected:
        return
    backbone_keys = {k[len("backbone."):] for k in own if k.startswith("backbone.")}
    if not given & own and given & backbone_keys:
        raise RuntimeError(
            "this state_dict holds the backbone alone (its keys have no 'backbone.' prefix and no exit heads): "
            "load it with model.backbone.load_state_dict(state_dict), or load it into the backbone before wrap() "
            "(timm: create_model(name, checkpoint_path=...)); the exit heads keep their initialisation"
        )
    lines = [f"the state_dict does not match this {type(model).__name__} (stages={model.stages}, {model.num_exits} exits)"]
    if missing:
        lines.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        lines.append(f"unexpected keys: {_listed(unexpected)}")
    if all(k.startswith("exits.") for k in missing | unexpected):
        lines.append("only exit heads differ: the checkpoint comes from a model wrapped at other stages or with other heads; wrap the backbone the way it was wrapped when saved")
    raise RuntimeError("; ".join(lines))


def wrap(
    model: nn.Module,
    stages: Sequence[int | str],
    head="linear",
    num_classes: int | None = None,
    *,
    head_kwargs: dict | None = None,
    eval_output: str = "all",
    input_size: Sequence[int] | None = None,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence = (),
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
        eval_output: ``"all"`` (a list in eval too), ``"final"`` or ``"ensemble"`` (one tensor in eval).
        input_size: ``(C, H, W)`` of the dummy input used to learn the features' shapes;
            defaults to the model's own (its patch embedding's, its pretrained_cfg's, or 3x224x224).
        leaf_modules, autowrap_functions: extra modules / functions fx should not trace into.

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
    resolve = getattr(stages, "resolve", None)
    if callable(resolve):  # a placement rule such as at_flops(): it picks the stages for this model
        stages = resolve(model, input_size, leaf_modules, autowrap_functions)
    plan = plan_exits(model, stages, input_size, leaf_modules, autowrap_functions)
    if num_classes is not None and num_classes != plan.num_classes:
        raise ValueError(
            f"num_classes={num_classes} disagrees with the backbone, whose head outputs {plan.num_classes} classes; "
            f"create the backbone with num_classes={num_classes} (timm: create_model(name, num_classes={num_classes}); "
            "or reset_classifier) or leave num_classes out"
        )
    heads = list(head) if isinstance(head, (list, tuple)) else [head] * len(plan.sites)
    if len(heads) != len(plan.sites):
        raise ValueError(f"head has {len(heads)} entries but there are {len(plan.sites)} stages {plan.stage_names}; give one head or one per stage")
    exits = nn.ModuleList([create_head(h, site, plan.num_classes, **(head_kwargs or {})) for h, site in zip(heads, plan.sites)])
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        exits.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    plan.sites = []  # the heads are built; drop the traced graphs the sites refer to
    return MultiExitModel(model, plan, exits, eval_output=eval_output)
