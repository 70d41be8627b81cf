"""Early exit as one artifact: a graph that holds the exit decisions, exported as one ONNX file or one `torch.export` program.

`EarlyExitGraph` chains a wrapped model's steps with `torch.cond`: after exit k, the graph
runs step k+1 only if some sample has not yet passed an exit's threshold; otherwise it returns.
Each sample takes the logits of the first exit it passed (the last exit takes the rest), the
rule `timm_exits.early_exit` follows, so that a runtime without PyTorch (ONNX Runtime, on a
phone or an edge box) exits early by itself.

At batch 1 that is early exit exactly: the later steps never run once the image has left. For a
batch, each sample still gets its own exit and logits, but a later step runs for the whole batch
while any of its samples is still running: the graph does not gather the rows that stay, because
a row count that depends on the data (``nonzero``) is a size `torch.export` must guard on inside
every later segment.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..fx.modes import evaluating
from ..model import MultiExitModel
from ..runtime.criteria import (
    Calibration,
    exit_confidence,
    exit_rule,
    next_streak,
    passes_nobody,
)
from .export import ExportError, export_program

__all__ = ["EarlyExitGraph", "export_early_exit", "export_onnx"]

ONNX_TORCH = (2, 10)  # torch.onnx's exporter of torch.cond (to ONNX If) with onnxscript >= 0.6


class EarlyExitGraph(nn.Module):
    """``x -> (logits, exit_index)`` with the exit decisions in the graph: what `export_onnx` and `export_early_exit` export.

    ``thresholds`` are on the confidence scale (`confidence_thresholds`: entropy negated), one per
    early exit; ``temperatures`` one per exit or None; ``ensemble`` False, True (the mean of the
    logits so far) or a `GeometricEnsemble`. Build it with `EarlyExitGraph.of`, which checks
    them as `early_exit` does.
    """

    def __init__(self, steps: list[nn.Module], thresholds: list[float], criterion, temperatures: list[float] | None = None,
                 ensemble=False):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.thresholds = list(thresholds)
        self.criterion = criterion
        self.temperatures = temperatures
        self.ensemble = ensemble  # a GeometricEnsemble is a module: its weights travel with the graph

    @classmethod
    def of(cls, model: MultiExitModel, threshold=0.9, criterion=None, ensemble=None, temperature=None, patience=None) -> EarlyExitGraph:
        """The graph of `model`'s eval steps, with `early_exit`'s arguments (a `Calibration` brings its criterion, ensemble
        and temperatures when those are left out)."""
        if not isinstance(model, MultiExitModel):
            raise TypeError(f"model must be a MultiExitModel (from timm_exits.wrap), got {type(model).__name__}")
        if isinstance(threshold, Calibration):
            criterion = threshold.criterion if criterion is None else criterion
            ensemble = threshold.ensemble if ensemble is None else ensemble
        criterion = "max_prob" if criterion is None else criterion
        ensemble = False if ensemble is None else ensemble
        thresholds, temperatures = exit_rule(model, threshold, criterion, ensemble, temperature, patience)
        if not model.has_segments:
            raise ExportError(
                f"{type(model.backbone).__name__} could not be traced by torch.fx (wrap() fell back to its forward_intermediates), "
                "so its first step computes every exit and leaving early would skip nothing: export the all-exits model instead, "
                "export_exits(model, x, steps=False)"
            )
        return cls(model.steps(training=False, portable=True), thresholds, criterion, temperatures, ensemble)

    @property
    def last(self) -> int:
        return len(self.steps) - 1

    def forward(self, x: torch.Tensor):
        running = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return self._from(0, (x,), running, None, None, (), ())

    def _scored(self, k: int, z: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """Exit k's logits as the criterion reads them (over its temperature, in the ensemble), and the state the next exit needs."""
        if self.temperatures is not None:
            z = z / self.temperatures[k]
        if self.ensemble is True:
            total = z.float() if k == 0 else state[0] + z.float()
            return (total / (k + 1)).to(z.dtype), (total,)
        if self.ensemble is not False:  # a GeometricEnsemble: it reads every exit so far
            history = (*state, z)
            return self.ensemble.combine(list(history)).to(z.dtype), history
        return z, ()

    def _passed(self, k: int, z: torch.Tensor, patience: tuple) -> tuple[torch.Tensor, tuple]:
        """Which samples pass exit k, and (for patience) the prediction and streak the next exit reads."""
        if self.criterion == "patience":
            predicted = z.argmax(-1)
            streak = next_streak(*(patience or (None, None)), predicted)
            return streak >= self.thresholds[k], (predicted, streak)
        return exit_confidence(z, self.criterion) >= self.thresholds[k], ()

    def _from(self, k: int, carried: tuple, running: torch.Tensor, logits, index, mixed: tuple, patience: tuple):
        """Exit k onward. ``running`` marks the rows no exit before k took; ``logits`` and ``index`` hold what the rows
        that left took (None before the first exit); ``mixed`` is the ensemble's state (the running sum, or the exits so
        far), ``patience`` the previous prediction and its streak.

        What a later exit decides goes into ``logits`` and ``index`` inside the branch that runs it, so that the
        result comes out of the `torch.cond` as it is: combining it with a value from outside the cond would make
        `torch.export` assert at run time that the batch is not 1 (it gives a cond's outputs sizes of their own).
        """
        z, onward = self.steps[k].run(carried)
        z, mixed = self._scored(k, z, mixed)
        if logits is None:  # the first exit: the result takes its dtype, as when every exit is computed and selected
            logits, index = z, torch.zeros_like(running, dtype=torch.long)
        if k == self.last:
            return torch.where(running.unsqueeze(-1), z.to(logits.dtype), logits), torch.where(running, k, index)
        if passes_nobody(self.thresholds[k], self.criterion):  # nobody can leave here: no decision in the graph
            return self._from(k + 1, onward, running, logits, index, mixed, patience)
        passed, patience = self._passed(k, z, patience)
        leaving = running & passed
        logits = torch.where(leaving.unsqueeze(-1), z.to(logits.dtype), logits)
        index = torch.where(leaving, k, index)
        still = running & ~passed
        values = (*onward, *mixed, *patience)
        if not all(isinstance(v, torch.Tensor) for v in values):
            kinds = [type(v).__name__ for v in values if not isinstance(v, torch.Tensor)]
            raise ExportError(f"step {k} carries {kinds} to the next step: torch.cond passes tensors only")
        n, m = len(onward), len(mixed)

        def go(still, logits, index, *values):
            return self._from(k + 1, values[:n], still, logits, index, values[n:n + m], values[n + m:])

        def stop(still, logits, index, *values):  # every row has left
            return logits.clone(), index.clone()

        return torch.cond(still.any(), go, stop, (still, logits, index, *values))


def _example(model: MultiExitModel, example_input, dynamic_batch: bool) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        got = getattr(example_input, "shape", type(example_input).__name__)
        raise ValueError(f"example_input must be a batch tensor (B, ...), got {got}")
    model.check_batch(example_input)
    model.check_channels(example_input.shape[1], f"example_input of shape {tuple(example_input.shape)}")
    if dynamic_batch and example_input.shape[0] < 2:  # torch.export specialises a dimension of size 1: trace on two copies
        return example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input


def export_early_exit(model: MultiExitModel, example_input: torch.Tensor, threshold=0.9, criterion=None, ensemble=None,
                      temperature=None, patience=None, *, dynamic_batch: bool = True, strict: bool = False) -> torch.export.ExportedProgram:
    """Early exit as one `torch.export` program, ``x -> (logits, exit_index)``, with the exit decisions in its graph.

    For ExecuTorch and AOTInductor: `torch.cond` runs a step only while a sample of the batch has
    passed no exit yet, so a batch of one image stops at its exit. The arguments are `early_exit`'s:
    a sample leaves at exit k when its confidence reaches ``threshold[k]``; ``exit_index`` counts
    from 0. A `Calibration` as `threshold` brings its criterion, ensemble and temperatures.

    Args:
        model: a `MultiExitModel` that fx traced (one that runs through ``forward_intermediates``
            computes every exit in its first step, so it is refused); exported in eval mode and
            left in the mode it was in.
        example_input: an input batch; one image is fine (with ``dynamic_batch`` it is traced twice over).
        threshold, criterion, ensemble, temperature, patience: as `early_exit`; ``criterion=None``
            and ``ensemble=None`` mean a `Calibration`'s own, else ``"max_prob"`` and no ensemble.
        dynamic_batch: let the batch dimension vary (each sample still takes its own exit; a batch
            runs a later step while any of its samples is still running).
        strict: torch.export's strict mode.
    """
    graph = EarlyExitGraph.of(model, threshold, criterion, ensemble, temperature, patience)
    example = _example(model, example_input, dynamic_batch)
    with evaluating(model), torch.no_grad():  # inference only: both branches of a cond then agree that nothing needs a gradient
        graph.eval()
        return export_program(graph, (example,), "early exit in one graph", model, dynamic_batch, strict)


def _onnx_ready() -> None:
    found = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if found < ONNX_TORCH:
        raise RuntimeError(
            f"export_onnx needs torch >= {ONNX_TORCH[0]}.{ONNX_TORCH[1]} (its ONNX exporter writes torch.cond as an ONNX If); this is "
            f"torch {torch.__version__}: upgrade torch, or use export_early_exit for a torch.export program"
        )
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"export_onnx needs {' and '.join(missing)}: pip install 'timm-exits[deploy]'")


def export_onnx(model: MultiExitModel, path, example_input: torch.Tensor, threshold=0.9, criterion=None, ensemble=None,
                temperature=None, patience=None) -> Path:
    """Write early exit as ONE ONNX file whose graph holds the exit decisions; returns its path.

    The file takes ``input`` and gives ``logits`` ``(B, C)`` and ``exit_index`` ``(B,)`` (int64,
    from 0 as in `early_exit`); its batch dimension is dynamic. The weights are inside the file,
    or in one external-data file beside it (``<name>.data``) when the model is too large for one
    protobuf (2 GB). ONNX Runtime runs it without PyTorch: a batch of one image stops computing
    at the exit it takes; in a larger batch each sample takes its own exit, but a later step runs
    for the whole batch while any sample is still running (`timm_exits.deploy.early_exit_graph`
    says why).

    The arguments are `export_early_exit`'s (and `early_exit`'s): ``threshold`` is a number,
    one per early exit, or a `Calibration`, whose criterion, ensemble and per-exit temperatures
    travel into the graph. Needs torch >= 2.10 and the ``deploy`` extra (onnx, onnxscript).
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must name an .onnx file, got {str(path)!r}")
    _onnx_ready()
    program = export_early_exit(model, example_input, threshold, criterion, ensemble, temperature, patience)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["input"], output_names=["logits", "exit_index"], verbose=False)
    except Exception as err:  # the exporter raises many types; each gets the same context
        raise ExportError(f"torch.onnx could not convert early exit in one graph of {type(model.backbone).__name__}: {err}") from err
    graph = onnx_program.model.graph
    for name, value in list(graph.initializers.items()):  # zero biases the exporter's fusions leave: ONNX Runtime warns of each
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    return path
