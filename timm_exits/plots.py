"""Figures, the only module that imports matplotlib: the cut model (`plot_exits`) and the accuracy-FLOPs trade-off (`plot_tradeoff`).

`plot_exits` runs the model once on a dummy input, exit by exit, records what each segment hands
its head and carries to the next, counts each part's FLOPs, and draws the cut model with
matplotlib's object API (pyplot and its backend are never touched). `plot_tradeoff` draws
`budgeted_curve`'s points beside each exit alone and other models.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch

from ._checks import figure_path
from .calibration.curves import AnytimePoint, CurvePoint
from .cost.flops import flops_report
from .fx.inputs import dummy_input
from .fx.modes import evaluating
from .heads import head_kind
from .model import MultiExitModel

__all__ = ["plot_exits", "describe_exits", "StepPicture"]


@dataclasses.dataclass(frozen=True)
class StepPicture:
    """What one step of the drawing shows: its stage, its head, the shapes it hands on, and its FLOPs per sample."""

    stage: str
    head: str
    feature: tuple[int, ...]  # what the head reads (the backbone's output for the last step)
    carried: list[tuple[int, ...]]  # what the next step reads
    segment_flops: float
    head_flops: float


def _shape(value) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape[1:]) if isinstance(value, torch.Tensor) else ()


@torch.no_grad()
def describe_exits(model: MultiExitModel, input_size: Sequence[int] | None = None) -> list[StepPicture]:
    """One `StepPicture` per exit, from one dummy forward (per-sample shapes, batch left out) and one FLOPs count."""
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"model must be a MultiExitModel (timm_exits.wrap(...)), got {type(model).__name__}")
    size = tuple(input_size) if input_size is not None else tuple(model.input_size)
    report = flops_report(model, input_size=size).exits
    pictures, before = [], 0
    with evaluating(model):
        run = model.run(dummy_input(model.backbone, size))
        for output in run:
            k, step, out = output.index, run.steps[output.index], run.last.out
            feature = out if isinstance(out, torch.Tensor) else out[0]
            head = head_kind(step.head) if step.head is not None else "backbone's own head"
            pictures.append(StepPicture(step.stage, head, _shape(feature), [_shape(c) for c in run.carried],
                                        report[k].backbone_flops - before, report[k].head_flops))
            before = report[k].backbone_flops
    return pictures


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "–"


def plot_exits(model: MultiExitModel, path=None, input_size: Sequence[int] | None = None, title: str | None = None, ax=None):
    """Draw `model` cut at its exits; returns the matplotlib Figure (saved to `path` too if given).

    Each segment is a box with the stage it ends at and its FLOPs; arrows between segments carry
    the values the next one reads (their per-sample shapes); each exit head hangs below its segment
    with the feature shape it reads, its FLOPs, and where its logits leave.
    """
    try:
        # lazy: matplotlib is in the demo extra, not a dependency
        from matplotlib.figure import Figure
        from matplotlib.patches import FancyBboxPatch
    except ImportError as err:
        raise ImportError("plot_exits needs matplotlib: pip install 'timm-exits[demo]'") from err
    path = figure_path(path, "exits.png") if path is not None else None
    steps = describe_exits(model, input_size)
    size = tuple(input_size) if input_size is not None else tuple(model.input_size)
    total = sum(s.segment_flops for s in steps) or 1.0
    scale, unit = (1e9, "GFLOPs") if total >= 1e9 else (1e6, "MFLOPs")
    n = len(steps)
    own = ax is None
    if own:
        fig = Figure(figsize=(2.6 * (n + 1), 3.6))
        ax = fig.subplots()
    fig = ax.figure
    ax.set_xlim(-0.2, 2.4 * n + 1.1)
    ax.set_ylim(-2.3, 1.25)
    ax.axis("off")

    def box(x, y, w, h, text, color):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", facecolor=color, edgecolor="0.25", linewidth=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8)

    def arrow(start, end, label, offset=(0, 0.12)):
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="0.3"))
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], label,
                ha="center", va="bottom", fontsize=7, color="0.2")

    width = 1.5
    box(0, 0, 1.0, 0.8, f"input\n{_dims(size)}", "#eeeeee")
    carried_in = [size]
    for k, step in enumerate(steps):
        x = 2.4 * (k + 1) - 0.6
        last = k == n - 1
        label = (f"segment {k + 1}\n→ {step.stage if not last else 'output'}\n"
                 f"{step.segment_flops / scale:.3g} {unit} ({step.segment_flops / total:.0%})")
        box(x, 0, width, 0.8, label, "#dbe9f6" if not last else "#d7ecd9")
        previous_right = 1.0 if k == 0 else 2.4 * k - 0.6 + width
        carried_label = " + ".join(_dims(c) for c in carried_in) if len(carried_in) < 3 else f"{len(carried_in)} values"
        arrow((previous_right + 0.05, 0.4), (x - 0.05, 0.4), carried_label)
        head_scale, head_unit = (1e6, "MFLOPs") if step.head_flops >= 1e5 else (1e3, "KFLOPs")
        head_text = f"{step.head}\n{step.head_flops / head_scale:.3g} {head_unit}" if not last else f"{step.head}\n(in segment {n})"
        box(x + 0.1, -1.3, width - 0.2, 0.7, head_text, "#fbe3c8" if not last else "#d7ecd9")
        arrow((x + width / 2, -0.05), (x + width / 2, -0.55), _dims(step.feature) if not last else "", offset=(0.45, -0.1))
        ax.text(x + width / 2, -1.75, f"exit {k + 1} logits", ha="center", va="center", fontsize=8, fontweight="bold")
        ax.annotate("", xy=(x + width / 2, -1.62), xytext=(x + width / 2, -1.35), arrowprops=dict(arrowstyle="->", color="0.3"))
        carried_in = step.carried
    cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or type(model.backbone).__name__
    ax.set_title(title or f"{name} cut at {', '.join(model.stages)}: segments, the values carried between them, and the exit heads",
                 fontsize=9)
    if own:
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def plot_tradeoff(curve: Sequence[CurvePoint], path=None, anytime: Sequence[AnytimePoint] | None = None, title: str | None = None,
                  points: dict | None = None, ax=None):
    """Draw accuracy against average FLOPs; returns the matplotlib Figure (saved to `path` too if given).

    Draws the budgeted curve, each exit alone (`anytime`, labeled "exit k") and `points`
    (``{label: (flops, accuracy)}``, other models such as the plain backbone) into `ax`, or into a
    new Figure. FLOPs are in MFLOPs or GFLOPs, whichever reads better. The accuracy axis spans at
    least 10 points, so that a difference of a few images does not look like a cliff. pyplot and
    its backend are never touched: the Figure shows in a notebook, and `path` may end in any
    format matplotlib writes (.png, .pdf, .svg).
    """
    try:
        from matplotlib.figure import Figure  # lazy: matplotlib is in the demo extra
    except ImportError as err:
        raise ImportError("plot_tradeoff needs matplotlib: pip install 'timm-exits[demo]'") from err
    if not curve:
        raise ValueError("curve is empty: pass the points of timm_exits.budgeted_curve(...)")
    path = figure_path(path, "tradeoff.png") if path is not None else None
    own = ax is None
    if own:
        fig = Figure(figsize=(6.5, 4.5))
        ax = fig.subplots()
    fig = ax.figure
    flops = [p.flops for p in curve] + [p.flops for p in anytime or []] + [f for f, _ in (points or {}).values()]
    scale, unit = (1e9, "GFLOPs") if flops and max(flops) >= 1e9 else (1e6, "MFLOPs")
    accuracies = [p.accuracy for p in curve]
    ax.plot([p.flops / scale for p in curve], [100 * p.accuracy for p in curve], "o-", ms=3, label="early exit, budgeted (MSDNet protocol)")
    if anytime:
        ax.plot([p.flops / scale for p in anytime], [100 * p.accuracy for p in anytime], "s--", label="each exit alone (anytime)")
        for p in anytime:
            ax.annotate(f"exit {p.exit + 1}", (p.flops / scale, 100 * p.accuracy), textcoords="offset points", xytext=(4, -12), fontsize=8)
        accuracies += [p.accuracy for p in anytime]
    for (label, (cost, accuracy)), marker in zip((points or {}).items(), itertools.cycle("D^vP*X")):
        ax.plot([cost / scale], [100 * accuracy], marker, ms=8, linestyle="none", label=label)
        accuracies.append(accuracy)
    if accuracies:
        low, high = 100 * min(accuracies), 100 * max(accuracies)
        pad = max(0.0, 10 - (high - low)) / 2 + 1
        bottom, top = low - pad, high + pad
        shift = max(0.0, top - 100) - max(0.0, -bottom)  # slide the window back inside [0, 100], keeping its span
        ax.set_ylim(max(0.0, bottom - shift), min(100.0, top - shift))
    ax.set_xlabel(f"average {unit} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if own:  # a figure of the caller's keeps its own layout
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
