"""Early exit as one artifact: a graph that holds the exit decisions, exported as one ONNX file or one `torch.export` program.

`EarlyExitGraph` chains a wrapped model's steps with `torch.cond`: after exit k, the graph
runs step k+1 only if some sample has not yet passed an exit's threshold; otherwise it returns.
Each sample takes the logits of the first exit it passed (the last exit takes the rest), the
rule `timm_exits.early_exit` follows, so that a runtime without PyTorch (ONNX Runtime, on a
phone or an edge box) exits early by itself.

Inside the branch that runs step k+1, the rows that stay are gathered (``nonzero``, then
``index_select`` of every value that follows the batch), so a later step computes only the
samples still running, as `early_exit` does; their logits are scattered back into the batch's
result by row index. The number of rows that stay is a size known only at run time; torch >= 2.10
exports it (an unbacked size inside the branch). Older torch fails on ``nonzero`` inside a cond,
so there the graph keeps the whole batch and a later step runs for all of it while any sample is
still running (each sample still takes its own exit and logits).
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
from ..runtime.rows import batch_kinds
from .export import ExportError, export_program

__all__ = ["EarlyExitGraph", "export_early_exit", "export_onnx"]

ONNX_TORCH = (2, 10)  # torch.onnx's exporter of torch.cond (to ONNX If) with onnxscript >= 0.6
EXTERNAL_WEIGHTS = 1536 << 20  # weights in bytes above which they go to a .data file: a protobuf holds at most 2 GB in all
GATHER_TORCH = (2, 10)  # torch.export of nonzero (an unbacked size) inside a cond branch; 2.5 fails to capture it


def _torch_at_least(version: tuple[int, int]) -> bool:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= version


class EarlyExitGraph(nn.Module):
    """``x -> (logits, exit_index)`` with the exit decisions in the graph: what `export_onnx` and `export_early_exit` export.

    ``thresholds`` are on the confidence scale (`confidence_thresholds`: entropy negated), one per
    early exit; ``temperatures`` one per exit or None; ``ensemble`` False, True (the mean of the
    logits so far) or a `GeometricEnsemble`. ``kinds`` says, for each cut, which carried values
    follow the batch (`timm_exits.runtime.rows.batch_kinds`): with it, each later step runs on the
    rows still running only; None keeps the whole batch. Build it with `EarlyExitGraph.of`, which
    checks them as `early_exit` does.
    """

    def __init__(self, steps: list[nn.Module], thresholds: list[float], criterion, temperatures: list[float] | None = None,
                 ensemble=False, kinds: list | None = None):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.thresholds = list(thresholds)
        self.criterion = criterion
        self.temperatures = temperatures
        self.ensemble = ensemble  # a GeometricEnsemble is a module: its weights travel with the graph
        self.kinds = kinds

    @classmethod
    def of(cls, model: MultiExitModel, threshold=0.9, criterion=None, ensemble=None, temperature=None, patience=None, *,
           example_input: torch.Tensor | None = None) -> EarlyExitGraph:
        """The graph of `model`'s eval steps, with `early_exit`'s arguments (a `Calibration` brings its criterion, ensemble
        and temperatures when those are left out).

        With ``example_input`` (a batch like the inputs) and torch >= 2.10, a later step runs on the
        rows still running only, as in `early_exit`; without it, or on older torch, it runs for the
        whole batch while any sample is still running.
        """
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
        kinds = None
        if example_input is not None:
            _check_example(model, example_input)
        if example_input is not None and _torch_at_least(GATHER_TORCH):
            with evaluating(model), torch.no_grad():
                kinds = batch_kinds(model, example_input)
        return cls(model.steps(training=False, portable=True), thresholds, criterion, temperatures, ensemble, kinds)

    @property
    def last(self) -> int:
        return len(self.steps) - 1

    @property
    def gathers(self) -> bool:
        """Whether a later step runs on the rows still running only (else on the whole batch)."""
        return self.kinds is not None

    def forward(self, x: torch.Tensor):
        live = torch.arange(x.shape[0], device=x.device) if self.gathers else torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return self._from(0, (x,), live, None, None, (), ())

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

    def _written(self, k: int, z: torch.Tensor, live: torch.Tensor, logits, index):
        """The batch's result with exit k's logits in the rows that reached it (a later exit overwrites the rows that go on)."""
        if logits is None:  # the first exit: the result takes its dtype, as when every exit is computed and selected
            return z, torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        z = z.to(logits.dtype)
        if self.gathers:  # `live` holds the batch's row numbers of the rows step k computed
            return logits.index_copy(0, live, z), index.index_fill(0, live, k)
        return torch.where(live.unsqueeze(-1), z, logits), torch.where(live, k, index)

    def _from(self, k: int, carried: tuple, live: torch.Tensor, logits, index, mixed: tuple, patience: tuple):
        """Exit k onward. ``live`` says which rows step k runs for: their row numbers in the batch when the graph gathers,
        else a mask over the batch of the rows no exit before k took. ``logits`` and ``index`` hold the batch's result so far
        (None before the first exit); ``mixed`` is the ensemble's state (the running sum, or the exits so far), ``patience``
        the previous prediction and its streak, each for the rows step k runs for.

        What a later exit decides goes into ``logits`` and ``index`` inside the branch that runs it, so that the
        result comes out of the `torch.cond` as it is: combining it with a value from outside the cond would make
        `torch.export` assert at run time that the batch is not 1 (it gives a cond's outputs sizes of their own).
        """
        z, onward = self.steps[k].run(carried)
        z, mixed = self._scored(k, z, mixed)
        logits, index = self._written(k, z, live, logits, index)
        if k == self.last:
            return logits, index
        if passes_nobody(self.thresholds[k], self.criterion):  # nobody can leave here: no decision in the graph
            return self._from(k + 1, onward, live, logits, index, mixed, patience)
        passed, patience = self._passed(k, z, patience)
        still = ~passed if self.gathers else live & ~passed
        values = (*onward, *mixed, *patience)
        if not all(isinstance(v, torch.Tensor) for v in values):
            kinds = [type(v).__name__ for v in values if not isinstance(v, torch.Tensor)]
            raise ExportError(f"step {k} carries {kinds} to the next step: torch.cond passes tensors only")
        n, m = len(onward), len(mixed)
        kinds = self.kinds[k] if self.gathers else None

        def go(still, live, logits, index, *values):
            if kinds is not None:  # run the next step on the rows that stay
                stay = still.nonzero().squeeze(1)
                torch._check(stay.shape[0] >= 1)  # the cond runs this branch only when someone stays
                live = live.index_select(0, stay)
                values = tuple(v.index_select(0, stay) if kind == "batch" else v
                               for v, kind in zip(values, (*kinds, *["batch"] * (len(values) - n))))
            else:
                live = still
            return self._from(k + 1, values[:n], live, logits, index, values[n:n + m], values[n + m:])

        def stop(still, live, logits, index, *values):  # every row has left
            return logits.clone(), index.clone()

        return torch.cond(still.any(), go, stop, (still, live, logits, index, *values))


def _check_example(model: MultiExitModel, example_input) -> None:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        got = getattr(example_input, "shape", type(example_input).__name__)
        raise ValueError(f"example_input must be a batch tensor (B, ...), got {got}")
    model.check_batch(example_input)
    model.check_channels(example_input.shape[1], f"example_input of shape {tuple(example_input.shape)}")


def _traced_on(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    if dynamic_batch and example_input.shape[0] < 2:  # torch.export specialises a dimension of size 1: trace on two copies
        return example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input


def export_early_exit(model: MultiExitModel, example_input: torch.Tensor, threshold=0.9, criterion=None, ensemble=None,
                      temperature=None, patience=None, *, dynamic_batch: bool = True, strict: bool = False) -> torch.export.ExportedProgram:
    """Early exit as one `torch.export` program, ``x -> (logits, exit_index)``, with the exit decisions in its graph.

    For ExecuTorch and AOTInductor: `torch.cond` runs a step only while a sample of the batch has
    passed no exit yet, and (on torch >= 2.10) only for the samples still running, so each
    sample stops computing at its exit, as in `early_exit`; on older torch a later step runs for
    the whole batch while any of its samples is still running. The arguments are `early_exit`'s:
    a sample leaves at exit k when its confidence reaches ``threshold[k]``; ``exit_index`` counts
    from 0. A `Calibration` as `threshold` brings its criterion, ensemble and temperatures.

    Args:
        model: a `MultiExitModel` that fx traced (one that runs through ``forward_intermediates``
            computes every exit in its first step, so it is refused); exported in eval mode and
            left in the mode it was in.
        example_input: an input batch; one image is fine (with ``dynamic_batch`` it is traced twice over).
        threshold, criterion, ensemble, temperature, patience: as `early_exit`; ``criterion=None``
            and ``ensemble=None`` mean a `Calibration`'s own, else ``"max_prob"`` and no ensemble.
        dynamic_batch: let the batch dimension vary; False fixes it at the example's. A fixed batch
            of one image has no rows to gather (running the next step is the decision itself), so
            that graph leaves the row bookkeeping out.
        strict: torch.export's strict mode.
    """
    graph = EarlyExitGraph.of(model, threshold, criterion, ensemble, temperature, patience, example_input=example_input)
    if not dynamic_batch and example_input.shape[0] == 1:
        graph.kinds = None
    example = _traced_on(example_input, dynamic_batch)
    with evaluating(model), torch.no_grad():  # inference only: both branches of a cond then agree that nothing needs a gradient
        graph.eval()
        return export_program(graph, (example,), "early exit in one graph", model, dynamic_batch, strict)


def _onnx_ready() -> None:
    if not _torch_at_least(ONNX_TORCH):
        raise RuntimeError(
            f"export_onnx needs torch >= {ONNX_TORCH[0]}.{ONNX_TORCH[1]} (its ONNX exporter writes torch.cond as an ONNX If); this is "
            f"torch {torch.__version__}: upgrade torch, or use export_early_exit for a torch.export program"
        )
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"export_onnx needs {' and '.join(missing)}: pip install 'timm-exits[deploy]'")


def _initializers_where_used(graph) -> None:
    """Drop the initializers nothing reads, and move each one that only an `If` branch reads into that branch.

    The exporter leaves zero biases its fusions no longer use (ONNX Runtime warns of each), and puts
    every weight in the main graph. ONNX Runtime's layout optimiser (NCHWc convolutions on x86) only
    rewrites a convolution whose weight is an initializer of its own graph, so a later step's
    convolutions ran unoptimised inside their branch (benchmarks/deploy.py measures the files).
    """
    for name, value in list(graph.initializers.items()):
        if value.is_graph_output():
            continue
        readers = {id(node.graph): node.graph for node, _ in value.uses()}
        if not readers or (len(readers) == 1 and next(iter(readers.values())) is not graph):
            del graph.initializers[name]
            if readers:
                next(iter(readers.values())).register_initializer(value)


def _weight_bytes(graph) -> int:
    """The bytes of every initializer, the branches' included."""
    return sum(v.const_value.nbytes for g in (graph, *graph.subgraphs()) for v in g.initializers.values() if v.const_value is not None)


def export_onnx(model: MultiExitModel, path, example_input: torch.Tensor, threshold=0.9, criterion=None, ensemble=None,
                temperature=None, patience=None, *, dynamic_batch: bool = True) -> Path:
    """Write early exit as ONE ONNX file whose graph holds the exit decisions; returns its path.

    The file takes ``input`` and gives ``logits`` ``(B, C)`` and ``exit_index`` ``(B,)`` (int64,
    from 0 as in `early_exit`); its batch dimension is dynamic. The weights are inside the file,
    or in one external-data file beside it (``<name>.data``) when the model is too large for one
    protobuf (2 GB). ONNX Runtime runs it without PyTorch: each sample of a batch stops computing
    at the exit it takes (a later step runs on the rows still running, gathered in the graph).

    The arguments are `export_early_exit`'s (and `early_exit`'s): ``threshold`` is a number,
    one per early exit, or a `Calibration`, whose criterion, ensemble and per-exit temperatures
    travel into the graph. ``dynamic_batch=False`` with a one-image example writes a file for
    one image at a time, without the row bookkeeping a batch needs (benchmarks/deploy.py times
    both). Needs torch >= 2.10 and the ``deploy`` extra (onnx, onnxscript).
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must name an .onnx file, got {str(path)!r}")
    _onnx_ready()
    program = export_early_exit(model, example_input, threshold, criterion, ensemble, temperature, patience, dynamic_batch=dynamic_batch)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["input"], output_names=["logits", "exit_index"], verbose=False)
    except Exception as err:  # the exporter raises many types; each gets the same context
        raise ExportError(f"torch.onnx could not convert early exit in one graph of {type(model.backbone).__name__}: {err}") from err
    _initializers_where_used(onnx_program.model.graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the exporter's own test of the size reads the main graph's initializers only, and the branches now hold most weights
    onnx_program.save(str(path), external_data=_weight_bytes(onnx_program.model.graph) > EXTERNAL_WEIGHTS)
    return path
