"""MultiExitModel: the backbone's graph cut into segments, an exit head after each cut."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
from torch import nn

from .._checks import positive_int
from ..fx.surgery import ExitPlan
from ..heads import CascadedHead
from .state_keys import check_state_keys
from .steps import ExitRun, ExitStep, build_steps

__all__ = ["MultiExitModel", "ExitOutputs"]

EVAL_OUTPUTS = ("all", "final", "ensemble")


class ExitOutputs(NamedTuple):
    """Per-exit logits and pooled features, shallow to deep (the last is the backbone's head)."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor]


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

    def __init__(self, backbone: nn.Module, plan: ExitPlan, exits: nn.ModuleList, eval_output: str | int = "all",
                 wrap_args: dict | None = None):
        super().__init__()
        self._wrap_args = dict(wrap_args) if wrap_args is not None else None
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
    def wrap_args(self) -> dict | None:
        """How `wrap` built this model (stages, heads, input size, leaf modules, cascade): what
        `save_pretrained` writes to ``config.json`` to build it again; None for a model built otherwise."""
        return self._wrap_args

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
                raise ValueError(
                    f"eval_output={value} is not an exit index: this model has {self.num_exits} exits, "
                    f"0..{self.num_exits - 1} (or -{self.num_exits}..-1)"
                )
        elif value not in EVAL_OUTPUTS:
            raise ValueError(f"eval_output must be one of {EVAL_OUTPUTS} or an exit index 0..{self.num_exits - 1}, got {value!r}")
        self._eval_output = value

    # -- steps ------------------------------------------------------------------------------------

    def _parts(self) -> tuple[nn.Module, ...]:
        return (self.backbone, *self.exits)

    def _build_steps(self, whole: bool = True) -> tuple[list[ExitStep], list[ExitStep]]:
        return build_steps(self.backbone, self._plan, list(self.exits), self.stages, whole)

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

    def replace_step_parts(self, replace, training: bool = False) -> None:
        """Put ``replace(part)`` in place of each segment and exit head of the steps for `training` (eval by default).

        Every replacement is built before any is put in, so a `replace` that raises leaves the steps
        as they were. The parts the steps were built from stay the model's modules: replacing a head
        or the backbone, or `reset_classifier`, rebuilds the steps from them (`timm_exits.compile_exits`
        puts compiled parts in this way).
        """
        steps = self.steps(training)
        parts = [(replace(step.segment), None if step.head is None else replace(step.head)) for step in steps]
        for step, (segment, head) in zip(steps, parts):
            step.segment, step.head = segment, head

    @property
    def has_segments(self) -> bool:
        """Whether each step computes only its own segment of the backbone, so that leaving at an exit skips the rest.

        False for a backbone fx could not trace: its steps run timm's ``forward_intermediates``,
        whose first step computes every exit's feature.
        """
        return self._plan.feature_indices is None

    def segments(self) -> list[fx.GraphModule]:
        """The backbone cut at the exits: segment k runs from exit k-1 to exit k (for the current mode).

        Empty for a backbone fx could not trace (its steps run timm's forward_intermediates).
        """
        steps = self.steps()
        return [s.segment for s in steps] if self.has_segments else []

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
        state["_wrap_args"] = state.pop("wrap_args", state.get("_wrap_args"))  # pickled when wrap set it as a plain attribute
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
            raise ValueError(
                f"return_features=True needs the input of {type(self.backbone).__name__}'s classifier, "
                "which wrap() could not find in its graph"
            )
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
            raise AttributeError(
                f"the backbone ({type(self.backbone).__name__}) has no {name}(): "
                "it is a timm model method; use model.backbone's own layers, or a timm backbone"
            )
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
        # timm's signature; a new pool changes the features the exits were cut from
        if global_pool is not None and global_pool != _pool_type(self.backbone):
            raise ValueError(
                f"global_pool={global_pool!r} would change the backbone's final features after wrap: "
                f"build the backbone with global_pool={global_pool!r}, then wrap it"
            )
        inner = [h.head if isinstance(h, CascadedHead) else h for h in self.exits]  # a cascade resets the head it wraps
        lacking = [f"exit {k + 1} ({type(h).__name__})" for k, h in enumerate(inner) if not callable(getattr(h, "reset_classifier", None))]
        if lacking:
            raise TypeError(
                f"the heads of {', '.join(lacking)} have no reset_classifier(num_classes): "
                "give them one, or wrap the backbone again after its own reset_classifier"
            )
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
        from ..runtime.early_exit import early_exit  # lazy: the runtime builds on the model, not the other way round

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
        from ..deploy.hub import save_pretrained  # lazy: hub builds models through this module

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
        raise TypeError(
            f"{type(backbone).__name__} has no reset_classifier and no nn.Linear of {old} outputs to replace: "
            "replace its classifier yourself, then wrap it again"
        )
    name, layer = found[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, attr, nn.Linear(layer.in_features, new, bias=layer.bias is not None,
                                    device=layer.weight.device, dtype=layer.weight.dtype))


def _pool_type(backbone: nn.Module):
    pool = getattr(backbone, "global_pool", None)
    return getattr(pool, "pool_type", pool)  # timm's SelectAdaptivePool2d, or a plain string


