"""MultiExitModel: the backbone's graph cut into segments, an exit head after each cut."""
from __future__ import annotations

import inspect
import re
from typing import NamedTuple, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._checks import positive_int
from .heads import CascadedHead, ExitHeads, check_head, create_head
from .surgery import ExitPlan, plan_exits
from .tracing import TraceOptions

__all__ = ["MultiExitModel", "ExitOutputs", "ExitStep", "ExitRun", "ExitOutput", "wrap"]

EVAL_OUTPUTS = ("all", "final", "ensemble")


class ExitOutputs(NamedTuple):
    """Per-exit logits and pooled features, shallow to deep (the last is the backbone's head)."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor]


class ExitOutput(NamedTuple):
    """One exit's output in a run: its index (from 0, like ``model(x)[index]``), logits and pooled feature.

    ``feature`` is None unless the run was asked for features; the last exit's is the backbone's
    pre-logits feature (None when `wrap` could not find it in the graph).
    """

    index: int
    logits: torch.Tensor
    feature: torch.Tensor | None


def _bind(graph: fx.Graph, backbone: nn.Module, whole: bool = True) -> fx.GraphModule:
    """A GraphModule for `graph` that reads the live backbone's modules.

    ``whole``: the only child is the backbone itself, so the segment's code reads
    ``self.backbone.<path>`` at every call and always sees the backbone's current modules,
    parameters and buffers (after ``.to()``, ``load_state_dict``, ``deepcopy``). Otherwise fx
    rebuilds just the module paths the graph uses (sharing the modules), so that an exported
    segment carries only its own weights.
    """
    holder = nn.Module()
    holder.backbone = backbone
    gm = fx.GraphModule(holder, graph, class_name="Segment")
    if whole:
        gm.backbone = backbone  # replace the partial copy of the hierarchy fx made by the real one
    return gm


def _check_same_structure(old: nn.Module, new: nn.Module) -> None:
    """Refuse a replacement backbone whose modules differ from the one the exits were cut from: its graph would call
    modules the new one lacks, or skip ones it has (a resnet34's third block, for a resnet18's graph)."""
    before, after = [n for n, _ in old.named_modules()], [n for n, _ in new.named_modules()]
    if before != after:
        k = next((k for k, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
        was, now = (names[k] if k < len(names) else "nothing" for names in (before, after))
        raise ValueError(
            f"model.backbone was replaced by a {type(new).__name__} whose modules differ from the {type(old).__name__} the exits were "
            f"cut from (first: {now!r} where it had {was!r}): the steps are that model's graph. Wrap the new backbone instead: "
            "timm_exits.wrap(new_backbone, stages=...)")


class ExitStep(nn.Module):
    """Step k of a wrapped model: segment k of the backbone, then exit head k.

    ``segment(*carried)`` returns ``(feature, carried for step k+1)``; the last step's returns the
    backbone's output and its pre-logits feature (or None). Called as a module, a step returns
    ``(logits, *carried for step k+1)`` (the last: the logits alone), the form an exit-by-exit
    runtime runs and `timm_exits.export_exits` exports.

    In a cascade (``wrap(..., cascade=True)``) a head also reads the previous exit's logits: the
    step before it carries its logits on, last (``passes_on``), and this step takes them off
    before its segment runs (``cascaded``), so that every runtime which carries values from step
    to step, early exit's row selection among them, carries those logits too.

    ``standalone`` is None when each step computes only its own segment, so that leaving at
    step k skips the rest (``skips``). A backbone fx could not trace runs through timm's
    ``forward_intermediates``, which computes every exit's feature in the first step; there
    ``standalone`` is the backbone from the input to this step's output alone, for counting what
    an exit would cost.
    """

    def __init__(self, segment: nn.Module, head: nn.Module | None, stage: str = "", standalone: nn.Module | None = None, passes_on: bool = False):
        super().__init__()
        self.segment = segment
        self.head = head
        self.stage = stage
        self.standalone = standalone
        self.passes_on = passes_on

    @property
    def skips(self) -> bool:
        """Whether leaving at this step skips the backbone's later work."""
        return self.standalone is None

    @property
    def cascaded(self) -> bool:
        """Whether this step's head also reads the previous exit's logits (carried last into this step)."""
        return bool(getattr(self.head, "cascaded", False))

    def split(self, carried: tuple) -> tuple[tuple, torch.Tensor | None]:
        """What the segment reads, and the previous exit's logits for a cascaded head (else None)."""
        return (tuple(carried[:-1]), carried[-1]) if self.cascaded else (tuple(carried), None)

    def logits(self, out, previous: torch.Tensor | None, return_features: bool = False):
        """The head on the segment's output (and on the previous exit's logits, in a cascade)."""
        extra = {"return_features": True} if return_features else {}
        try:
            return self.head(out, previous, **extra) if self.cascaded else self.head(out, **extra)
        except ValueError as err:  # torch's words name neither the head nor the fix
            if "Expected more than 1 value per channel when training" not in str(err):
                raise
            raise ValueError(
                f"the {type(self.head).__name__} after {self.stage!r} normalises over the batch (BatchNorm) in training, and this "
                f"batch gives it one value per channel ({err}): train with batches of 2 or more, or a head without BatchNorm "
                "(head='linear')") from None

    def onward(self, carried, logits: torch.Tensor) -> tuple:
        """What the next step reads: the segment's carried values, then these logits when the next head is cascaded."""
        return (*carried, logits) if self.passes_on else tuple(carried)

    def uncompiled(self) -> "ExitStep":
        """This step with parts `timm_exits.compile_exits` compiled replaced by the modules they compile (for counting)."""
        segment, head = (getattr(part, "compiled_from", part) for part in (self.segment, self.head))
        if segment is self.segment and head is self.head:
            return self
        return ExitStep(segment, head, self.stage, self.standalone, self.passes_on)

    def forward(self, *carried):
        carried, previous = self.split(carried)
        out, carried = self.segment(*carried)
        if self.head is None:
            return _main_output(out)
        z = self.logits(out, previous)
        return (z, *self.onward(carried, z))


def _main_output(out):
    # auxiliary outputs some backbones add in training (inception's aux logits): keep the main one
    return out if isinstance(out, torch.Tensor) else out[0]


class ExitRun:
    """One pass of a wrapped model, one exit at a time: iterating yields each exit's `ExitOutput`, shallow to deep.

    Between two items, ``carried`` holds the values the next step reads (the input before the
    first). A caller that stops computing some samples, as early exit does, replaces it with
    those samples' rows; the next steps then run on the smaller batch.
    """

    def __init__(self, steps: list[ExitStep], x, features: bool = False, checkpointed: bool = False, num_classes: int | None = None):
        self.steps = steps
        self.carried: tuple = (x,)
        self.features = features
        self.checkpointed = checkpointed
        self.num_classes = num_classes

    def _segment(self, step: ExitStep, carried: tuple):
        if self.checkpointed:
            segment = getattr(step.segment, "compiled_from", step.segment)  # compile_exits' parts: checkpoint the graph itself
            if isinstance(segment, fx.GraphModule):
                return checkpoint(segment, *carried, use_reentrant=False)
        return step.segment(*carried)

    def __iter__(self):
        for k, step in enumerate(self.steps):
            carried, previous = step.split(self.carried)
            out, carried = self._segment(step, carried)
            if step.head is None:  # the backbone's own head: carried is its pre-logits feature
                self.carried = ()
                logits = _main_output(out)
                if self.num_classes is not None and logits.shape[-1] != self.num_classes:
                    raise RuntimeError(
                        f"the backbone's head now outputs {logits.shape[-1]} classes, the exits {self.num_classes}: its classifier was "
                        f"changed after wrap(); call reset_classifier({logits.shape[-1]}) on the wrapped model, which resets every exit, or wrap the backbone again"
                    )
                yield ExitOutput(k, logits, carried if self.features else None)
                return
            if self.features:
                try:
                    z, feature = step.logits(out, previous, return_features=True)
                except TypeError as err:  # looked at only on failure: the training step's hot path stays as it was
                    if "return_features" not in str(err):
                        raise
                    raise TypeError(
                        f"the head of exit {k + 1} ({type(step.head).__name__}) takes no return_features: a feature term needs heads whose "
                        "forward(x, return_features=True) also returns the pooled feature its classifier read (the built-in heads do)"
                    ) from err
            else:
                z, feature = step.logits(out, previous), None
            self.carried = step.onward(carried, z)
            yield ExitOutput(k, z, feature)


class _Intermediates(nn.Module):
    """First step of a backbone fx could not trace: timm's forward_intermediates computes every exit's feature."""

    def __init__(self, backbone: nn.Module, indices: list[int]):
        super().__init__()
        self.backbone = backbone
        self.indices = list(indices)

    def forward(self, x):
        final, feats = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=False)
        return feats[0], (*feats[1:], final)


class _Handed(nn.Module):
    """A later step of such a backbone: its feature was computed by the first step; hand it out, carry the rest."""

    def forward(self, *carried):
        return carried[0], carried[1:]


class _OwnHead(nn.Module):
    """The last step of such a backbone: its own head on the final feature map."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, final):
        return self.backbone.forward_head(final), self.backbone.forward_head(final, pre_logits=True)


class _UpTo(nn.Module):
    """The backbone from the input to one intermediate feature, stopping there."""

    def __init__(self, backbone: nn.Module, index: int):
        super().__init__()
        self.backbone = backbone
        self.index = index

    def forward(self, x):
        return self.backbone.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)[0]


class MultiExitModel(nn.Module):
    """A backbone with exit heads; ``model(x)`` returns one ``(B, num_classes)`` logits per exit.

    Build it with `timm_exits.wrap`. Exits are ordered shallow to deep; the last one is the
    backbone's own classifier, so in eval mode ``model(x)[-1]`` equals ``model.backbone(x)``.
    ``model.backbone`` is the original module (a plain checkpoint loads into it) and
    ``model.exits`` holds the heads; the steps that run the backbone piece by piece hold no
    parameters of their own.

    Args (of ``forward``):
        x: the input batch, as the backbone takes it.
        return_features: also return each exit's pooled feature (the last exit's is the
            backbone's pre-logits feature), as an `ExitOutputs`.

    In eval mode, ``eval_output="final"`` or ``"ensemble"`` (mean of the exits' logits) makes
    ``forward`` return one tensor, for code that expects a plain classifier (timm's validate).
    Every way of running the model runs its `steps`: ``forward``, `early_exit` and `export_exits`
    through `run`, the one loop over them; `flops_report` registers the same steps and runs that
    loop under fvcore.
    """

    def __init__(self, backbone: nn.Module, plan: ExitPlan, exits: nn.ModuleList, eval_output: str | int = "all"):
        super().__init__()
        self.backbone = backbone
        self.exits = exits
        self.eval_output = eval_output
        self.stages = list(plan.stage_names)
        self.input_size = plan.input_size
        self._num_classes = plan.num_classes  # the model's own: reset_classifier changes it, the shared plan stays
        self.grad_checkpointing = False
        self._plan = plan
        self._steps = (self._parts(), *self._build_steps())  # (what they were built from, training steps, eval steps)

    @property
    def eval_output(self) -> str | int:
        """What ``forward`` returns in eval mode: ``"all"`` (every exit), or one tensor: ``"final"``,
        ``"ensemble"`` (the mean of the exits' logits) or an exit index ``k`` (``model(x)[k]``, so that
        code expecting a plain classifier, timm's validate.py say, scores exit k)."""
        return self._eval_output

    @eval_output.setter
    def eval_output(self, value: str | int) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -self.num_exits <= value < self.num_exits:
                raise ValueError(f"eval_output={value} is not an exit index: this model has {self.num_exits} exits, 0..{self.num_exits - 1} (or -{self.num_exits}..-1)")
        elif value not in EVAL_OUTPUTS:
            raise ValueError(f"eval_output must be one of {EVAL_OUTPUTS} or an exit index 0..{self.num_exits - 1}, got {value!r}")
        self._eval_output = value

    # -- steps ------------------------------------------------------------------------------------

    def _parts(self) -> tuple[nn.Module, ...]:
        return (self.backbone, *self.exits)

    def _build_steps(self, whole: bool = True) -> tuple[list[ExitStep], list[ExitStep]]:
        heads, stages = list(self.exits) + [None], self.stages + ["final"]
        if getattr(heads[0], "cascaded", False):
            raise ValueError(f"the head of exit 1 ({type(heads[0]).__name__}) is cascaded, but there is no exit before it to read: cascade the heads after the first")
        passes = [bool(getattr(h, "cascaded", False)) for h in heads[1:]] + [False]  # step k carries its logits on to a cascaded head k+1
        indices = self._plan.feature_indices
        if indices is not None:  # fx could not trace it: timm's own API computes every feature at once
            segments = [_Intermediates(self.backbone, indices)] + [_Handed() for _ in indices[1:]] + [_OwnHead(self.backbone)]
            alone = [_UpTo(self.backbone, i) for i in indices] + [self.backbone]
            steps = [ExitStep(s, h, n, a, p) for s, h, n, a, p in zip(segments, heads, stages, alone, passes)]
            return steps, steps

        def build(graphs):
            return [ExitStep(_bind(g, self.backbone, whole), h, n, passes_on=p) for g, h, n, p in zip(graphs, heads, stages, passes)]

        eval_steps = build(self._plan.eval_segments)
        code = [[g.python_code("self").src for g in gs] for gs in (self._plan.train_segments, self._plan.eval_segments)]
        if code[0] == code[1]:  # most models trace alike in both modes: then one set of steps serves both
            return eval_steps, eval_steps
        return build(self._plan.train_segments), eval_steps

    def steps(self, training: bool | None = None, *, portable: bool = False) -> list[ExitStep]:
        """The model's steps, one per exit, for its current mode (or for `training`).

        The model switches between its training and eval graphs itself, as its mode changes.
        ``portable=True`` gives new steps whose segments hold only the backbone modules they call
        (shared, not copied), so that an exported step carries only its own weights.
        """
        training = self.training if training is None else training
        if portable:
            return self._build_steps(whole=False)[0 if training else 1]
        built, parts = self._steps, self._parts()
        if len(built[0]) != len(parts) or any(a is not b for a, b in zip(built[0], parts)):  # a head or the backbone was replaced
            if parts[0] is not built[0][0]:
                _check_same_structure(built[0][0], parts[0])
            built = self._steps = (parts, *self._build_steps())
        return built[1] if training else built[2]

    def segments(self) -> list[fx.GraphModule]:
        """The backbone cut at the exits: segment k runs from exit k-1 to exit k (for the current mode).

        Empty for a backbone fx could not trace (its steps run timm's forward_intermediates).
        """
        steps = self.steps()
        return [s.segment for s in steps] if steps[0].skips else []

    def run(self, x: torch.Tensor, return_features: bool = False) -> ExitRun:
        """Run the model exit by exit: an `ExitRun` over the current mode's steps (see `ExitRun`)."""
        self.check_batch(x)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        return ExitRun(self.steps(), x, return_features, checkpointed, self.num_classes)

    def check_batch(self, x) -> None:
        """Raise a ValueError when `x` is a tensor without the batch dimension: one image, ``(C, H, W)``, for a ``(B, C, H, W)`` model."""
        if isinstance(x, torch.Tensor) and x.dim() == len(self.input_size):  # a traced proxy is not a tensor: nothing to check
            batched = "(B, " + ", ".join(map(str, self.input_size)) + ")"
            raise ValueError(f"x of shape {tuple(x.shape)} has no batch dimension: the model takes {batched}; "
                             "for one image, x.unsqueeze(0)")

    def check_channels(self, channels: int, what: str) -> None:
        """Raise a ValueError when `what` (an input described to the user) has channels the first layer does not take."""
        first = self._plan.first_layer
        if first is not None and channels != first[1]:
            plural = "" if channels == 1 else "s"
            raise ValueError(f"{what} has {channels} channel{plural}; the model's first layer ({first[0]}) expects {first[1]}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_steps"] = None  # the steps are rebuilt against the copied backbone
        return state

    def __setstate__(self, state):
        if "eval_output" in state:  # pickled before eval_output became a checked property
            state["_eval_output"] = state.pop("eval_output")
        if "_num_classes" not in state:  # pickled before reset_classifier
            state["_num_classes"] = state["_plan"].num_classes
        super().__setstate__(state)
        self._steps = (self._parts(), *self._build_steps())

    # -- forward ----------------------------------------------------------------------------------

    @property
    def num_exits(self) -> int:
        return len(self.exits) + 1

    def forward(self, x: torch.Tensor, return_features: bool = False):
        outputs = self.forward_exits(x, return_features)
        if return_features or self.training or self.eval_output == "all":
            return outputs
        if self.eval_output == "ensemble":
            return torch.stack(outputs).mean(0)
        return outputs[-1 if self.eval_output == "final" else self.eval_output]

    def forward_exits(self, x: torch.Tensor, return_features: bool = False):
        """Every exit's logits (and features), in eval mode too, whatever ``eval_output`` says."""
        outputs = list(self.run(x, return_features))
        logits = [o.logits for o in outputs]
        if not return_features:
            return logits
        if outputs[-1].feature is None:
            raise ValueError(f"return_features=True needs the input of {type(self.backbone).__name__}'s classifier, which wrap() could not find in its graph")
        return ExitOutputs(logits, [o.feature for o in outputs])

    # -- what trainers ask a timm model for --------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def pretrained_cfg(self):
        return getattr(self.backbone, "pretrained_cfg", None)

    @property
    def default_cfg(self):
        return self.pretrained_cfg

    def _backbone_method(self, name: str):
        method = getattr(self.backbone, name, None)
        if not callable(method):  # torchvision models have none of timm's methods
            raise AttributeError(f"the backbone ({type(self.backbone).__name__}) has no {name}(): it is a timm model method; use model.backbone's own layers, or a timm backbone")
        return method

    def get_classifier(self) -> nn.Module:
        return self._backbone_method("get_classifier")()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier of `num_classes` outputs for the backbone and for every exit head, as timm's ``reset_classifier``.

        The features and heads' other layers keep their weights; each new classifier is freshly
        initialised (fine-tuning on a new label set). Heads of your own need a
        ``reset_classifier(num_classes)`` method (the built-in ones have it).
        """
        num_classes = positive_int(num_classes, "num_classes", "a multi-exit model needs a classifier on every exit")
        if global_pool is not None and global_pool != _pool_type(self.backbone):  # timm's signature; a new pool changes the features the exits were cut from
            raise ValueError(f"global_pool={global_pool!r} would change the backbone's final features after wrap: build the backbone with global_pool={global_pool!r}, then wrap it")
        inner = [h.head if isinstance(h, CascadedHead) else h for h in self.exits]  # a cascade resets the head it wraps
        lacking = [f"exit {k + 1} ({type(h).__name__})" for k, h in enumerate(inner) if not callable(getattr(h, "reset_classifier", None))]
        if lacking:
            raise TypeError(f"the heads of {', '.join(lacking)} have no reset_classifier(num_classes): give them one, or wrap the backbone again after its own reset_classifier")
        _reset_backbone_classifier(self.backbone, self._num_classes, num_classes)
        for h in self.exits:
            h.reset_classifier(num_classes)
        self._num_classes = num_classes
        self._steps = (self._parts(), *self._build_steps())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's ``forward_features`` (its final feature map), as for a plain timm model."""
        return self._backbone_method("forward_features")(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The backbone's ``forward_head`` on its final feature map: the last exit's classifier."""
        return self._backbone_method("forward_head")(x, pre_logits=pre_logits)

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

    def early_exit(self, x: torch.Tensor, threshold=0.9, criterion="max_prob", ensemble: bool = False, temperature=None, patience=None):
        """Classify `x`, each sample stopping at its first confident exit; see `timm_exits.early_exit`."""
        from .inference import early_exit  # lazy: inference builds on this module, not the other way round

        return early_exit(self, x, threshold, criterion, ensemble, temperature, patience)

    # -- checkpoints ------------------------------------------------------------------------------

    def unwrap(self) -> nn.Module:
        """The plain backbone, with whatever weights training gave it (the same module, not a copy).

        Wrapping never changed it, so it runs, saves and exports as the original model does;
        ``copy.deepcopy(model.unwrap())`` for one that no longer shares weights with the wrapper.
        """
        return self.backbone

    def save_pretrained(self, save_directory, model_name: str | None = None, model_args: dict | None = None,
                        data_config: dict | None = None):
        """Write ``config.json`` and ``model.safetensors`` to `save_directory`; see `timm_exits.save_pretrained`."""
        from .hub import save_pretrained  # lazy: hub builds models through this module

        return save_pretrained(self, save_directory, model_name, model_args, data_config)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, with an error that says how a strict mismatch came about.

        A checkpoint of the backbone alone (a timm checkpoint) belongs in ``model.backbone``; one
        of a model wrapped at other stages or with other heads differs under ``exits.``, or, when
        the heads' shapes happen to agree, in the wrap it records (``exits._extra_state``).
        """
        if strict:
            check_state_keys(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"stages={self.stages}, num_exits={self.num_exits}, eval_output={self.eval_output!r}"


def _reset_backbone_classifier(backbone: nn.Module, old: int, new: int) -> None:
    """timm's ``reset_classifier``; for a model without one (torchvision), its last ``nn.Linear`` of `old` outputs gets replaced."""
    reset = getattr(backbone, "reset_classifier", None)
    if callable(reset):
        reset(new)
        return
    found = [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.Linear) and m.out_features == old]
    if not found:
        raise TypeError(f"{type(backbone).__name__} has no reset_classifier and no nn.Linear of {old} outputs to replace: replace its classifier yourself, then wrap it again")
    name, layer = found[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, attr, nn.Linear(layer.in_features, new, bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype))


def _pool_type(backbone: nn.Module):
    pool = getattr(backbone, "global_pool", None)
    return getattr(pool, "pool_type", pool)  # timm's SelectAdaptivePool2d, or a plain string


def _uncascaded(keys: set[str]) -> set[str]:
    """State keys as they would be without cascades: a CascadedHead's own map dropped, the head it wraps unwrapped."""
    return {re.sub(r"^exits\.(\d+)\.head\.", r"exits.\1.", k) for k in keys if not re.match(r"^exits\.\d+\.previous\.", k)}


def _listed(keys: set[str], limit: int = 8) -> str:
    names = sorted(keys)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_keys(model: MultiExitModel, state_dict) -> None:
    """Raise a RuntimeError naming the keys in which `state_dict` and `model` differ, and the likely cause."""
    record = "exits._extra_state"  # the wrap's record: compared below, and absent from checkpoints saved before it
    own = set(model.state_dict().keys()) - {record}
    given = set(state_dict.keys()) - {record}
    missing, unexpected = own - given, given - own
    if not missing and not unexpected:
        mismatch = model.exits.mismatch(state_dict.get(record)) if isinstance(model.exits, ExitHeads) else None
        if mismatch:  # before anything loads: the model stays as it was
            raise RuntimeError(mismatch)
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
    cascaded = lambda keys: any(".previous." in k for k in keys)  # noqa: E731 - a CascadedHead's map of the previous exit's logits
    if cascaded(missing) != cascaded(unexpected) and _uncascaded(own) == _uncascaded(given):  # the same heads, cascaded on one side only
        lines.append(f"the checkpoint comes from a model wrapped with cascade={cascaded(unexpected)}, this one with cascade={cascaded(missing)}: wrap it as it was saved")
    elif all(k.startswith("exits.") for k in missing | unexpected):
        lines.append("only exit heads differ: the checkpoint comes from a model wrapped at other stages or with other heads; wrap the backbone the way it was wrapped when saved")
    raise RuntimeError("; ".join(lines))


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
        raise TypeError(f"model is a {type(model).__name__}: wrap the model inside it (model.module), then apply {type(model).__name__} to the wrapped model")
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
        raise ValueError(f"cascade={cascade!r} needs at least two exit heads (a head after the first reads the one before it); stages {plan.stage_names} give {len(plan.sites)}")
    heads = list(head) if isinstance(head, (list, tuple)) else [head] * len(plan.sites)
    if len(heads) != len(plan.sites):
        raise ValueError(f"head has {len(heads)} entries but there are {len(plan.sites)} stages {plan.stage_names}; give one head or one per stage")
    exits = ExitHeads([create_head(h, site, plan.num_classes, **(head_kwargs or {})) for h, site in zip(heads, plan.sites)], plan.stage_names)
    ref = next(iter(model.parameters()), None)
    if ref is not None:
        exits.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    for k, (h, site, module) in enumerate(zip(heads, plan.sites, exits)):
        check_head(module, site, plan.num_classes, f"the head of exit {k + 1} ({site.stage!r}, {h if isinstance(h, str) else getattr(h, '__name__', type(h).__name__)})")
    for k in range(1, len(exits) if cascade else 0):
        exits[k] = CascadedHead(exits[k], plan.num_classes, norm=cascade == "layernorm")
    plan.sites = []  # the heads are built; drop the traced graphs the sites refer to
    wrapped = MultiExitModel(model, plan, exits, eval_output=eval_output)
    # what rebuilds this wrap from the backbone (timm_exits.save_pretrained writes it to config.json)
    wrapped.wrap_args = {"stages": list(plan.stage_names), "head": [_reference(h) for h in heads], "head_kwargs": dict(head_kwargs or {}),
                         "input_size": list(plan.input_size), "leaf_modules": [_reference(m) for m in leaf_modules],
                         "autowrap_functions": [_reference(f) for f in autowrap_functions], "cascade": cascade}
    return wrapped


def _reference(obj) -> str:
    """A head name as it is; a class or function as ``module:qualname`` (``<locals>`` in it: not importable); anything else ``<...>``."""
    if isinstance(obj, str):
        return obj
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        return f"<a {type(obj).__qualname__} instance>"  # a functools.partial, a callable object: no name imports it
    return f"{obj.__module__}:{obj.__qualname__}"
