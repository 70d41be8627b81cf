"""Early-exit inference that stops computing for confident samples: per-sample skipping, exit by exit.

`early_exit` runs a `MultiExitModel` exit by exit (`MultiExitModel.run`). After each exit, the
samples whose confidence passes that exit's threshold leave the batch; the others go on,
carrying only their own rows of the values the next step reads. The last exit takes whoever is
left. The criteria and thresholds are `criteria.py`'s, the row mechanics `rows.py`'s; choosing the
thresholds from cached validation logits is `timm_exits.calibration`'s job.
"""
from __future__ import annotations

import dataclasses

import torch

from ..model import MultiExitModel
from .criteria import (
    exit_confidence,
    exit_rule,
    next_streak,
    passes_nobody,
    warn_at_caller,
)
from .rows import batch_kinds, exit_costs_on, split_rows, take_rows

__all__ = ["EarlyExitResult", "early_exit"]


# -- criteria and thresholds ------------------------------------------------------------------------


# -- early exit -------------------------------------------------------------------------------------


@dataclasses.dataclass
class EarlyExitResult:
    """What `early_exit` returns, one row per sample.

    ``logits (B, C)`` from the exit each sample took (or the ensemble of the exits up to it),
    ``exit_index (B,)`` counting from 0 like ``model(x)[k]``, and ``flops (B,)``: what each
    sample cost, the backbone up to its exit plus every head it was scored by (fvcore's
    convention, as in `flops_report`).
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    flops: torch.Tensor

    def exit_counts(self, num_exits: int | None = None) -> list[int]:
        """How many samples left at each exit."""
        if num_exits is None and self.exit_index.numel() == 0:
            return []  # no sample, no exit seen
        n = num_exits or int(self.exit_index.max().item()) + 1
        return torch.bincount(self.exit_index.cpu(), minlength=n).tolist()


def early_exit(model: MultiExitModel, x: torch.Tensor, threshold=0.9, criterion="max_prob", ensemble: bool = False,
               temperature=None, patience=None) -> EarlyExitResult:
    """Classify `x`, each sample stopping at the first exit where it is confident enough.

    Args:
        model: a `MultiExitModel` in eval mode.
        x: the input batch.
        threshold: one number for every early exit, one per early exit (``num_exits - 1``), or a
            `Calibration`. A sample leaves at exit k when its confidence is ``>= threshold[k]``
            (for ``"entropy"``: when its entropy is ``<= threshold[k]``); ``inf`` keeps everyone
            (``-inf`` for entropy).
        criterion: ``"max_prob"``, ``"entropy"``, ``"margin"``, ``"patience"`` or a callable
            ``(logits) -> (B,)`` confidence (higher = more confident). ``"patience"`` (PBEE, Zhou et
            al. 2020): a sample leaves once its predicted class has stayed the same for `patience`
            consecutive exits (the threshold is that count).
        patience: with ``criterion="patience"``, the count (it replaces `threshold`).
        ensemble: decide on (and return) the mean logits of the exits so far instead of the
            current exit's alone (the anytime ensemble), or a fitted `GeometricEnsemble`
            (`fit_geometric_ensemble`: Zero Time Waste's learned geometric ensembling).
        temperature: one temperature per exit (`timm_exits.calibrate_temperature`): exit k's
            logits are divided by it before the criterion reads them, and returned so. A
            `Calibration` made with temperatures brings its own.

    Runs under `torch.no_grad`; only the rows of samples still in the batch are computed after
    each exit. Equivalent, per sample, to computing every exit and selecting.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"early_exit needs a MultiExitModel (timm_exits.wrap(...)), got {type(model).__name__}")
    if model.training:
        raise RuntimeError("early_exit runs in eval mode (batch norm statistics, dropout); call model.eval() first")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch tensor (B, ...), got {getattr(x, 'shape', type(x).__name__)}")
    model.check_batch(x)
    model.check_channels(x.shape[1], f"x of shape {tuple(x.shape)}")
    thresholds, temperatures = exit_rule(model, threshold, criterion, ensemble, temperature, patience)
    if not model.has_segments:
        warn_at_caller(
            "this model runs through forward_intermediates (fx could not trace it): every exit is computed, then one is selected"
        )
    with torch.no_grad():
        spent = exit_costs_on(model, tuple(x.shape[1:]), x.device)
        return _early_exit(model, x, thresholds, criterion, ensemble, spent, temperatures)


def _early_exit(model: MultiExitModel, x, thresholds, criterion, ensemble, spent, temperatures=None) -> EarlyExitResult:
    batch, last = x.shape[0], model.num_exits - 1
    kinds = batch_kinds(model, x) if batch > 1 else None
    # Until a sample leaves, nothing is indexed: the positions of the samples still running (rows), the
    # logits and exits chosen so far are made at the first exit where one leaves; when none does, the
    # last exit's logits are the result as they come.
    rows = logits = exit_index = dtype = total = previous = streak = None
    geometric = not isinstance(ensemble, bool)
    history: list[torch.Tensor] = []  # for a geometric ensemble: the exits so far, rows of the samples still running
    run = model.run(x)
    for out in run:
        k, z = out.index, out.logits
        if temperatures is not None:
            z = z / temperatures[k]
        if geometric:
            history.append(z)
            z = ensemble.combine(history).to(z.dtype)
        elif ensemble:
            total = z.float() if total is None else total + z.float()
            z = (total / (k + 1)).to(z.dtype)
        dtype = z.dtype if dtype is None else dtype  # the result's dtype: the first exit's, as when every exit is computed and selected
        if k == last:
            if rows is None:  # a copy, as the indexed result always was: a compiled step's output buffer is reused by its next call
                logits = z.to(dtype, copy=True)
            else:
                logits[rows] = z.to(dtype)  # a head may return another dtype than the first exit's
            break
        if criterion == "patience":
            streak = next_streak(previous, streak, z.argmax(-1))
            previous = z.argmax(-1)
            passed = streak >= thresholds[k]
        elif passes_nobody(thresholds[k], criterion):
            continue  # everyone stays: no confidence to compute, nothing to read on the host
        else:
            passed = exit_confidence(z, criterion) >= thresholds[k]
        count = int(passed.sum())  # the one host read at this exit: how many leave
        if count == 0:
            continue
        leaving, staying = split_rows(passed, count)
        if rows is None:
            rows = torch.arange(batch, device=x.device)
            logits = z.new_empty(batch, z.shape[1], dtype=dtype)
            exit_index = torch.full((batch,), last, dtype=torch.long, device=x.device)
        logits[rows[leaving]] = z[leaving].to(dtype)
        exit_index[rows[leaving]] = k
        if staying.numel() == 0:
            break  # everyone has left: the later steps never run
        rows = rows[staying]
        run.carried = take_rows(run.carried, kinds[k], staying)
        if ensemble is True:
            total = total[staying]
        if geometric:
            history = [h[staying] for h in history]
        if streak is not None:
            streak, previous = streak[staying], previous[staying]
    if exit_index is None:
        exit_index = torch.full((batch,), last, dtype=torch.long, device=x.device)
    return EarlyExitResult(logits, exit_index, spent[exit_index])
