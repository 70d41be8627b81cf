"""Export for deployment: the all-exits model and each exit step as `torch.export` programs.

A runtime that exits early runs the steps one after another: step k takes the values carried
from step k-1 (the input for step 0), and returns exit k's logits followed by the values step
k+1 needs. The last step returns the backbone's own logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..fx.modes import evaluating
from ..model import ExitStep, MultiExitModel

__all__ = ["ExitStep", "ExportedExits", "ExportError", "exit_steps", "export_exits"]


class ExportError(RuntimeError):
    """torch.export could not capture part of a multi-exit model; the message says which part and why."""


class _AllExits(nn.Module):
    def __init__(self, model: MultiExitModel):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.forward_exits(x))


def exit_steps(model: MultiExitModel) -> list[ExitStep]:
    """The eval-mode steps of `model`, one per exit; running them in turn equals ``model.forward_exits``.

    Each step's segment holds only the backbone modules it calls (shared with the model, not
    copied), so an exported step carries only its own weights.
    """
    _check_model(model)
    steps = model.steps(training=False, portable=True)
    if not model.has_segments:
        raise ExportError(
            f"{type(model.backbone).__name__} could not be traced by torch.fx (wrap() fell back to its forward_intermediates), "
            "so it has no segments to run exit by exit; export the all-exits model alone: export_exits(model, x, steps=False)"
        )
    return steps


@dataclass
class ExportedExits:
    """What `export_exits` returns.

    Attributes:
        program: the all-exits model, ``x -> (logits of exit 1, ..., logits of exit N)``, or None.
        steps: one program per exit (see `ExitStep`), or an empty list.
        stages: the stage of each early exit.
    """

    program: torch.export.ExportedProgram | None
    steps: list = field(default_factory=list)
    stages: list[str] = field(default_factory=list)

    def run_steps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the exported steps in turn and return every exit's logits (what a runtime would do, without exiting)."""
        if not self.steps:
            raise ValueError("this export has no steps; call export_exits(..., steps=True)")
        logits, carried = [], (x,)
        for step in self.steps[:-1]:
            z, *carried = step.module()(*carried)
            logits.append(z)
        logits.append(self.steps[-1].module()(*carried))
        return logits


def _check_model(model) -> None:
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"model must be a MultiExitModel (from timm_exits.wrap), got {type(model).__name__}")


def _batch_dims(args, batch):
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def export_program(module: nn.Module, args: tuple, what: str, model: MultiExitModel, dynamic_batch: bool, strict: bool):
    """`torch.export` `module` on `args` (batch dimension dynamic or not); a failure is an `ExportError` naming `what` and why."""
    shapes = _batch_dims(args, torch.export.Dim("batch", min=1, max=1 << 16)) if dynamic_batch else None
    if shapes is not None and isinstance(module, ExitStep):
        shapes = (shapes,)  # a step takes its carried values as *args: one entry for the tuple
    try:
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=strict)
    except Exception as err:  # torch raises many types here; every one gets the same context
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "see the error above"
        if "data-dependent" in str(err) or "data dependent" in str(err) or "GuardOnDataDependent" in type(err).__name__:
            hint = (
                "the model branches on tensor values (data-dependent control flow); torch.export needs a graph without such "
                "branches: rewrite the branch with torch.cond, or keep it out of the exported part"
            )
        elif dynamic_batch:
            hint += "; dynamic_batch=False exports for the example's batch size only"
        raise ExportError(
            f"torch.export could not capture {what} of {type(model.backbone).__name__}: {type(err).__name__}: {text}; {hint}"
        ) from err


def export_exits(model: MultiExitModel, example_input: torch.Tensor, *,
                 steps: bool = True, whole: bool = True, dynamic_batch: bool = True, strict: bool = False) -> ExportedExits:
    """`torch.export` the all-exits model and each exit step, in eval mode; returns `ExportedExits`.

    Args:
        model: a `MultiExitModel`; it is exported in eval mode and left in the mode it was in.
        example_input: an input batch of the shape to export for.
        steps: export each step (segment + head) for exit-by-exit runtimes.
        whole: export the all-exits model.
        dynamic_batch: let the batch dimension vary, as an early-exit runtime needs (its batch
            shrinks after each exit); False specialises the programs to
            the example's batch size.
        strict: torch.export's strict mode (TorchDynamo capture) instead of its non-strict tracing.
    """
    _check_model(model)
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor batch, got {type(example_input).__name__}")
    if dynamic_batch and (example_input.dim() == 0 or example_input.shape[0] < 2):
        raise ValueError("example_input needs a batch of at least 2 for dynamic_batch=True (torch.export specialises sizes 0 and 1)")
    pieces = exit_steps(model) if steps else []  # a model without segments fails here, before anything is exported
    with evaluating(model):
        program = export_program(_AllExits(model), (example_input,), "the all-exits model", model, dynamic_batch, strict) if whole else None
        exported, names = [], model.stages + ["the backbone's head"]
        if pieces:
            with torch.no_grad():
                run = model.run(example_input)
                inputs = [run.carried for _ in run][:-1]  # what each step reads: the input, then what each exit carries on
            inputs.insert(0, (example_input,))
            for k, (step, carried) in enumerate(zip(pieces, inputs)):
                exported.append(export_program(step, carried, f"step {k} (up to {names[k]})", model, dynamic_batch, strict))
    return ExportedExits(program, exported, list(model.stages))
