"""Combining exits: mean of logits or of probabilities, fixed or learnable weights, anytime ensembles, and
Zero Time Waste's weighted geometric ensemble (`timm_exits.fit_geometric_ensemble` fits it)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["exit_ensemble", "anytime_ensemble", "ExitEnsemble", "GeometricEnsemble", "ENSEMBLE_MODES"]

ENSEMBLE_MODES = ("logits", "probs")


def check_logits(outputs, name: str = "outputs") -> list[torch.Tensor]:
    """The per-exit logits as a list of ``(B, C)`` tensors of one shape; raise naming what is wrong."""
    logits = getattr(outputs, "logits", outputs)  # an ExitOutputs gives its logits
    if isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{name} must be the per-exit logits (a list of (B, C) tensors, what a MultiExitModel returns), got one tensor "
            f"of shape {tuple(logits.shape)}; a model built with eval_output='final' or 'ensemble' returns one tensor in eval mode"
        )
    if not isinstance(logits, (list, tuple)) or not logits:
        raise TypeError(f"{name} must be a non-empty list of (B, C) logits tensors, got {type(logits).__name__}")
    for i, z in enumerate(logits):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a (B, C) logits tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name}[{i}] must be (B, C) logits, got shape {tuple(z.shape)}")
        if z.shape != logits[0].shape:
            raise ValueError(
                f"all exits must give logits of one shape (B, C); {name}[0] is {tuple(logits[0].shape)} but {name}[{i}] is {tuple(z.shape)}"
            )
    return list(logits)


def _check_mode(mode: str) -> None:
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"mode must be one of {ENSEMBLE_MODES}, got {mode!r}")


def _check_weights(weights, num_exits: int) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32) if not isinstance(weights, torch.Tensor) else weights
    if w.dim() != 1 or len(w) != num_exits:
        raise ValueError(f"weights must hold one number per exit ({num_exits}), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool(w.sum() > 0):
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    return w


def _combine(logits: list[torch.Tensor], weights: torch.Tensor | None, mode: str) -> torch.Tensor:
    n = len(logits)
    w = torch.full((n,), 1.0 / n) if weights is None else weights / weights.sum()
    stacked = torch.stack(logits)  # (N, B, C)
    w = w.to(device=stacked.device, dtype=torch.float32).view(n, 1, 1)
    if mode == "logits":
        return (stacked.float() * w).sum(0).to(stacked.dtype)
    # log of the weighted mean probability: argmax and softmax behave like logits
    log_p = F.log_softmax(stacked.float(), dim=-1) + torch.log(w.clamp_min(1e-38))
    return torch.logsumexp(log_p, dim=0).to(stacked.dtype)


def exit_ensemble(outputs, weights: Sequence[float] | torch.Tensor | None = None, mode: str = "logits") -> torch.Tensor:
    """The ensemble of all exits, ``(B, C)``.

    Args:
        outputs: per-exit logits (a list of ``(B, C)`` tensors) or an `ExitOutputs`.
        weights: one non-negative weight per exit (normalised to sum 1); default: equal.
        mode: ``"logits"`` — the weighted mean of the logits; ``"probs"`` — the log of the
            weighted mean of the softmax probabilities (so ``softmax`` of the result is that mean
            and ``argmax`` is the ensemble's prediction).

    Example::

        >>> z = [torch.randn(4, 10) for _ in range(3)]
        >>> exit_ensemble(z, mode="probs").softmax(1).sum(1)   # rows are distributions
    """
    _check_mode(mode)
    logits = check_logits(outputs)
    return _combine(logits, _check_weights(weights, len(logits)), mode)


def anytime_ensemble(outputs, weights: Sequence[float] | torch.Tensor | None = None, mode: str = "logits") -> list[torch.Tensor]:
    """The ensembles of exits 1..k for every k (the anytime prediction after k exits), shallow to deep.

    Entry k (0-based) combines exits 0..k with their `weights` renormalised over those exits.
    """
    _check_mode(mode)
    logits = check_logits(outputs)
    w = _check_weights(weights, len(logits))
    if w is not None and not bool(w[0] > 0):
        raise ValueError(
            f"weights[0] must be positive: the anytime ensemble after exit 1 is exit 1 alone, normalised by its weight; got {w.tolist()}"
        )
    return [_combine(logits[: k + 1], None if w is None else w[: k + 1], mode) for k in range(len(logits))]


class ExitEnsemble(nn.Module):
    """A module that combines per-exit logits into one ``(B, C)`` prediction.

    Args:
        num_exits: how many exits it combines.
        mode: ``"logits"`` (weighted mean of logits) or ``"probs"`` (log of the weighted mean of
            probabilities), as in `exit_ensemble`.
        weights: initial weights, one per exit (default: equal).
        learnable: make the weights a parameter (kept positive and normalised with a softmax over
            log-weights); hand ``ensemble.parameters()`` to the optimizer and train it with any
            loss on its output.
    """

    def __init__(self, num_exits: int, mode: str = "logits", weights: Sequence[float] | None = None, learnable: bool = False):
        super().__init__()
        if not isinstance(num_exits, int) or num_exits < 1:
            raise ValueError(f"num_exits must be a positive int, got {num_exits!r}")
        _check_mode(mode)
        w = _check_weights(weights, num_exits)
        w = torch.full((num_exits,), 1.0 / num_exits) if w is None else w.float()
        self.num_exits = num_exits
        self.mode = mode
        self.learnable = learnable
        log_w = torch.log((w / w.sum()).clamp_min(1e-12))
        if learnable:
            self.log_weights = nn.Parameter(log_w)
        else:
            self.register_buffer("log_weights", log_w)

    @property
    def weights(self) -> torch.Tensor:
        """The normalised weights, one per exit."""
        return self.log_weights.softmax(0)

    def forward(self, outputs) -> torch.Tensor:
        logits = check_logits(outputs)
        if len(logits) != self.num_exits:
            raise ValueError(f"this ExitEnsemble combines {self.num_exits} exits, got {len(logits)}")
        return _combine(logits, self.weights, self.mode)

    def anytime(self, outputs) -> list[torch.Tensor]:
        """The ensembles of exits 1..k with these weights, for every k."""
        logits = check_logits(outputs)
        if len(logits) != self.num_exits:
            raise ValueError(f"this ExitEnsemble combines {self.num_exits} exits, got {len(logits)}")
        w = self.weights
        return [_combine(logits[: k + 1], w[: k + 1], self.mode) for k in range(len(logits))]

    def extra_repr(self) -> str:
        w = ", ".join(f"{v:.3f}" for v in self.weights.detach().tolist())
        return f"num_exits={self.num_exits}, mode={self.mode!r}, learnable={self.learnable}, weights=[{w}]"



class GeometricEnsemble(nn.Module):
    """One weighted geometric ensemble per exit: ``combine([z_0, ..., z_k])`` is exit k's ensemble logits."""

    def __init__(self, num_exits: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(num_exits, int) or num_exits < 1 or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_exits and num_classes must be ints >= 1, got {num_exits!r} and {num_classes!r}")
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(k + 1, generator=generator) * 0.01) for k in range(num_exits)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_exits)])

    @property
    def num_exits(self) -> int:
        return len(self.weights)

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """Exit ``len(logits) - 1``'s ensemble of `logits` (exits 0..k, each ``(B, C)``): unnormalised logits."""
        k = len(logits) - 1
        if not 0 <= k < self.num_exits:
            raise ValueError(f"the ensemble has {self.num_exits} exits, given the logits of {len(logits)}")
        logp = torch.stack([F.log_softmax(z.float(), dim=-1) for z in logits])  # (k + 1, B, C)
        w = self.weights[k].exp().view(-1, 1, 1)
        return (w * logp).mean(0) + self.biases[k]

    def forward(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every exit's ensemble logits."""
        return [self.combine(list(logits[: k + 1])) for k in range(len(logits))]
