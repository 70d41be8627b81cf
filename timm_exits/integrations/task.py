"""`MultiExitTask`: a multi-exit model and its loss as a timm training task.

timm's task-based training (``timm/task/``, timm >= 1.0.23) drives any `TrainingTask`:
``result = task(input, target); result["loss"].backward()``, plus ``prepare_distributed``,
``compile``, EMA and checkpoint hooks. On an older timm the same class works as a plain module
with the same methods, for a hand-written loop.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from timm.utils import ModelEmaV3
from timm.utils.model import unwrap_model as _unwrap  # peels DDP (.module), torch.compile (._orig_mod), EMA wrappers
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..losses import EnsembleKnowledgeDistillationLoss, MultiExitLoss, create_loss, loss_names
from ..model import ExitOutputs, MultiExitModel

try:  # timm's task API, from timm 1.0.23
    from timm.task import TrainingTask as _TaskBase
except ImportError:  # timm before 1.0.23: a plain module, exercised by CI's lowest-versions job
    _TaskBase = nn.Module

__all__ = ["MultiExitTask", "MultiExitTrainable"]

_logger = logging.getLogger(__name__)


class MultiExitTrainable(nn.Module):
    """The model and its loss as one module, so that DDP, torch.compile and EMA see every trainable
    parameter: the backbone's, the exit heads' and the loss's own (MATE's teacher weights, feature
    adapters). Its forward runs the model and the loss: ``(input, target, teacher_logits) ->
    (loss, per-exit logits, the loss's components)``.
    """

    def __init__(self, model: MultiExitModel, criterion: MultiExitLoss):
        super().__init__()
        self.model = model
        self.criterion = criterion

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The model's no-weight-decay names under ``model.`` (timm's optimizer factory reads this)."""
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def wants_features(self) -> bool:
        return float(getattr(self.criterion, "feature_weight", 0.0) or 0.0) > 0.0

    def forward(self, input: torch.Tensor, target: torch.Tensor, teacher_logits: list[torch.Tensor] | None = None):
        outputs = self.model.forward_exits(input, return_features=self.wants_features())
        if teacher_logits is None:
            loss = self.criterion(outputs, target)
        else:
            loss = self.criterion(outputs, target, teacher_logits)
        logits = outputs.logits if isinstance(outputs, ExitOutputs) else outputs
        return loss, torch.stack(logits), dict(self.criterion.components)


def _num_classes(module: nn.Module) -> int | None:
    module = _unwrap(module)
    n = getattr(module, "num_classes", None)
    return n if isinstance(n, int) else None


class MultiExitTask(_TaskBase):
    """Train a `MultiExitModel` with a multi-exit loss wherever timm trains a model.

    ``task(input, target)`` returns ``{"loss", "output", "exit_logits", <components>}``:
    ``output`` is the final exit's ``(B, C)`` logits (what timm's metrics read),
    ``exit_logits`` every exit's, stacked ``(E, B, C)``, and the loss's last components as
    detached tensors (``"ce/exit1"``, ``"distill/exit2"``, ``"temperature"``, ...) for logging.

    Args:
        model: the wrapped model (`timm_exits.wrap`).
        criterion: a multi-exit loss, or its short name (`timm_exits.loss_names`), built for
            ``model.num_exits`` exits with ``criterion_kwargs``.
        teachers: frozen teacher models for the ensemble-KD loss (``"ekd"``); each is called on
            the same input under ``no_grad`` and must output the model's number of classes.
        criterion_kwargs: keyword arguments of `timm_exits.create_loss` when `criterion` is a name
            (``epochs`` feeds the SDN and MSD schedules).
        device, dtype, verbose: as timm's tasks take them.

    The loss lives inside the trainable module (`MultiExitTrainable`), so DDP all-reduces its
    parameters' gradients and EMA averages them. Hand ``task.parameters()`` (the teachers'
    are frozen) or ``task.get_trainable_module().parameters()`` to the optimizer.
    Per-epoch schedules read ``task.set_epoch(epoch)``.
    """

    def __init__(
        self,
        model: MultiExitModel,
        criterion: MultiExitLoss | str = "eed",
        teachers: Sequence[nn.Module] | nn.Module | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ):
        if _TaskBase is nn.Module:
            super().__init__()
            self.device = device if device is not None else torch.device("cpu")
            self.dtype = dtype if dtype is not None else torch.get_default_dtype()
            self.verbose = verbose
        else:
            super().__init__(device=device, dtype=dtype, verbose=verbose)
        inner = _unwrap(model)
        if not isinstance(inner, MultiExitModel):
            raise TypeError(
                f"model must be a MultiExitModel: wrap the backbone first (timm_exits.wrap(model, stages=...)), got {type(model).__name__}"
            )
        n = inner.num_exits
        if isinstance(criterion, str):
            criterion = create_loss(criterion, num_exits=n, **(criterion_kwargs or {}))
        elif criterion_kwargs:
            raise ValueError(f"pass either a loss name with criterion_kwargs or a loss instance, not both: {sorted(criterion_kwargs)}")
        if not isinstance(criterion, MultiExitLoss):
            raise TypeError(
                f"criterion must be a timm_exits loss (a MultiExitLoss) or one of {loss_names()}, got {type(criterion).__name__}"
            )
        if criterion.num_exits is not None and criterion.num_exits != n:
            raise ValueError(
                f"criterion was built for num_exits={criterion.num_exits} "
                f"but the model has {n} exits (stages {inner.stages} + the backbone's head)"
            )
        self.teachers = self._check_teachers(teachers, criterion, inner)
        self.trainable_module = MultiExitTrainable(model, criterion.to(device=self.device))
        if verbose:
            _logger.info(f"{type(self).__name__}: {n} exits, criterion={type(criterion).__name__}, teachers={len(self.teachers)}")

    @staticmethod
    def _check_teachers(teachers, criterion: MultiExitLoss, model: MultiExitModel) -> nn.ModuleList:
        wants = isinstance(criterion, EnsembleKnowledgeDistillationLoss)
        if isinstance(teachers, nn.ModuleDict):
            raise TypeError("teachers must be a module, or a list or nn.ModuleList of modules, got an nn.ModuleDict: "
                            "pass list(teachers.values())")
        # an nn.ModuleList holds teachers (calling it fails); any other module is one teacher
        one = isinstance(teachers, nn.Module) and not isinstance(teachers, nn.ModuleList)
        teachers = [] if teachers is None else [teachers] if one else list(teachers)
        if wants and not teachers:
            raise ValueError("EnsembleKnowledgeDistillationLoss needs teachers: MultiExitTask(model, 'ekd', teachers=[teacher, ...])")
        if teachers and not wants:
            raise ValueError(f"teachers are only used by the ensemble-KD loss ('ekd'); {type(criterion).__name__} takes none")
        for k, t in enumerate(teachers):
            if not isinstance(t, nn.Module):
                raise TypeError(f"teachers[{k}] must be an nn.Module, got {type(t).__name__}")
            classes = _num_classes(t)
            if classes is not None and classes != model.num_classes:
                raise ValueError(
                    f"teachers[{k}] ({type(_unwrap(t)).__name__}) outputs {classes} classes but the model has {model.num_classes}"
                )
        assignment = getattr(criterion, "assignment", None)
        if teachers and assignment is not None and max(assignment) >= len(teachers):
            raise ValueError(f"the loss's assignment refers to teacher {max(assignment)} but {len(teachers)} teachers were given")
        if teachers and assignment is None and len(teachers) not in (1, model.num_exits):
            raise ValueError(
                f"{len(teachers)} teachers for {model.num_exits} exits: give one per exit, a single one, or the loss an assignment"
            )
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
        return nn.ModuleList(teachers)

    # -- what the task holds ---------------------------------------------------------------------

    def _trainable(self, ema: bool = False) -> MultiExitTrainable:
        module = self.get_trainable_module(ema=ema)
        if module is None:
            raise RuntimeError("this task has no EMA module: call setup_ema() first")
        return _unwrap(module)

    @property
    def model(self) -> MultiExitModel:
        return self._trainable().model

    @property
    def criterion(self) -> MultiExitLoss:
        return self._trainable().criterion

    def get_trainable_module(self, ema: bool = False) -> nn.Module | None:
        if ema:
            return getattr(self, "trainable_module_ema", None)
        return self.trainable_module

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        """The multi-exit model (compiled, when `compile` ran); set its ``eval_output`` to
        ``"final"`` or ``"ensemble"`` for timm's validate, which wants one tensor."""
        if module is None:
            compiled = getattr(self, "eval_model_ema" if ema else "eval_model", None)
            if compiled is not None:
                return compiled
            module = self.get_trainable_module(ema=ema)
            if module is None:
                return None
        return _unwrap(module).model

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` (0-based): the loss's per-epoch schedules (SDN ramp, MSD cosine) read it."""
        self.criterion.set_epoch(epoch)
        if self.has_ema():
            self._trainable(ema=True).criterion.set_epoch(epoch)

    # -- distributed, compile, EMA ----------------------------------------------------------------

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> MultiExitTask:
        """Wrap the model and the loss in DistributedDataParallel; teachers stay frozen and unwrapped.

        Every exit head and the loss's parameters get a gradient at every step, so DDP needs no
        ``find_unused_parameters``.
        """
        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """torch.compile the training step (model and loss) and, separately, the eval model; returns the latter."""
        trainable = self._trainable()
        self.eval_model = torch.compile(trainable.model, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        for t in self.teachers:
            t.forward = torch.compile(t.forward, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False, device: torch.device | None = None, **kwargs) -> nn.Module:
        """An EMA copy of the model and the loss (timm's ModelEmaV3)."""
        self.trainable_module_ema = ModelEmaV3(self._trainable(), decay=decay, use_warmup=use_warmup, device=device, **kwargs)
        return self.trainable_module_ema

    def has_ema(self) -> bool:
        return getattr(self, "trainable_module_ema", None) is not None

    def update_ema(self, step: int | None = None) -> None:
        if not self.has_ema():
            return
        ema = self.trainable_module_ema
        try:
            ema.update(self._trainable(), step=step)
        except TypeError:  # pragma: no cover - ModelEmaV2.update takes no step
            ema.update(self._trainable())

    def no_sync(self):
        """DDP's no_sync (gradient accumulation) when distributed, a no-op otherwise."""
        module = self.trainable_module
        return module.no_sync() if hasattr(module, "no_sync") else nullcontext()

    def get_clip_parameters(self, exclude_head: bool = False):
        """Parameters to clip: the model's (less the backbone's classifier with `exclude_head`) and the loss's."""
        trainable = self._trainable()
        params = list(trainable.model.parameters())
        if exclude_head:
            head = {id(p) for p in trainable.model.get_classifier().parameters()}
            params = [p for p in params if id(p) not in head]
        return params + list(trainable.criterion.parameters())

    # -- checkpoints ------------------------------------------------------------------------------

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """The loss's state (temperature, epoch, MATE weights, adapters) and how the model was wrapped."""
        trainable = _unwrap(module) if module is not None else self._trainable(ema=ema)
        model = trainable.model
        return {
            "criterion": trainable.criterion.state_dict(),
            "criterion_class": type(trainable.criterion).__name__,
            "stages": list(model.stages),
            "heads": [type(h).__name__ for h in model.exits],
        }

    def load_task_state(self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None,
                        ema: bool = False) -> None:
        if not state:
            return
        trainable = _unwrap(module) if module is not None else self._trainable(ema=ema)
        self._check_wrapping(state, trainable.model)
        saved = state.get("criterion_class")
        if strict and saved is not None and saved != type(trainable.criterion).__name__:
            raise RuntimeError(f"the checkpoint was trained with {saved} but this task's criterion is {type(trainable.criterion).__name__}")
        trainable.criterion.load_state_dict(state["criterion"], strict=strict)

    @staticmethod
    def _check_wrapping(state: dict[str, Any], model: MultiExitModel) -> None:
        saved = (state.get("stages"), state.get("heads"))
        here = (list(model.stages), [type(h).__name__ for h in model.exits])
        if saved[0] is not None and tuple(saved) != here:
            raise RuntimeError(
                f"the checkpoint comes from a model wrapped at stages={saved[0]} with heads {saved[1]}; "
                f"this model is wrapped at stages={here[0]} with heads {here[1]}: wrap the backbone the same way to resume"
            )

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=None) -> dict[str, Any]:
        """``{"state_dict": the multi-exit model's weights, "task_state": get_task_state()}`` (``_ema`` keys for EMA)."""
        if ema and not self.has_ema():
            return {}
        model = self._trainable(ema=ema).model
        suffix = "_ema" if ema else ""
        return {f"state_dict{suffix}": model.state_dict(), f"task_state{suffix}": self.get_task_state(ema=ema)}

    def load_checkpoint_state(self, state_dict: dict[str, Any], task_state: dict[str, Any] | None = None,
                              ema: bool = False, strict: bool = True) -> None:
        """Load what `get_checkpoint_state` saved; a differently wrapped model gets an error naming the difference."""
        trainable = self._trainable(ema=ema)
        if task_state:
            self._check_wrapping(task_state, trainable.model)
        trainable.model.load_state_dict(state_dict, strict=strict)
        self.load_task_state(task_state, strict=strict, ema=ema)

    # -- the step ---------------------------------------------------------------------------------

    def _teacher_logits(self, input: torch.Tensor, batch: int, classes: int) -> list[torch.Tensor] | None:
        if not len(self.teachers):
            return None
        with torch.no_grad():
            logits = [t(input) for t in self.teachers]
        for k, z in enumerate(logits):
            if not isinstance(z, torch.Tensor) or z.shape != (batch, classes):
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"teachers[{k}] returned {got}; the model's exits give (B, C) = {(batch, classes)}")
        return logits

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        teacher_logits = self._teacher_logits(input, input.shape[0], model.num_classes)
        loss, exit_logits, components = self.trainable_module(input, target, teacher_logits)
        result = {"loss": loss, "output": exit_logits[-1], "exit_logits": exit_logits}
        for name, value in components.items():
            if value.dim() == 0:
                result[name] = value
            else:
                result.update({f"{name}/exit{i + 1}": v for i, v in enumerate(value.unbind(0))})
        return result
