"""Multi-exit cross entropy: every exit trained on the labels, weighted (Shallow-Deep Networks' ramp among the schedules)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import MultiExitLoss

__all__ = ["MultiExitCELoss"]


class MultiExitCELoss(MultiExitLoss):
    """sum_i w_i CE(z_i): the weighted per-exit cross entropy, with fixed weights or the SDN ramp.

    Args:
        weights: one weight per exit (default all 1), for ``schedule=None``.
        schedule: ``"sdn"`` — Shallow-Deep Networks (Kaya et al., ICML 2019): the final exit has
            weight 1 and early exit i has w_i = min(C_i, 0.01 + (epoch + 1) C_i / epochs), rising
            linearly to C_i. Call ``loss_fn.set_epoch(epoch)`` at the start of each epoch.
        depths: C_i of the early exits, their depth fraction (SDN places exits at 15, 30, ..., 90 %
            of the network's cost and uses those). Default: evenly spaced, i / N.
        epochs: the length of training, for the ramp.

    The authors' code counts epochs from 1 (``0.01 + epoch * C / epochs``); ``set_epoch`` is
    0-based like timm's loop, hence the ``+ 1``.
    """

    def __init__(self, weights: Sequence[float] | None = None, schedule: str | None = None,
                 depths: Sequence[float] | None = None, epochs: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if schedule not in (None, "sdn"):
            raise ValueError(f"schedule must be None (fixed weights) or 'sdn', got {schedule!r}")
        if schedule == "sdn":
            if weights is not None:
                raise ValueError("give either weights (fixed) or schedule='sdn', not both")
            if not isinstance(epochs, int) or epochs < 1:
                raise ValueError(f"schedule='sdn' needs epochs, the number of training epochs (a positive int), got {epochs!r}")
        if depths is not None:
            if schedule != "sdn":
                raise ValueError(
                    "depths set the SDN schedule's C_i: give schedule='sdn' (and epochs) with them, or fixed weights without them"
                )
            if any(not 0.0 < d <= 1.0 for d in depths):
                raise ValueError(f"depths must be fractions in (0, 1], one per early exit, got {list(depths)}")
            self._expect_exits("depths", len(depths) + 1)
        if weights is not None:
            if any(not math.isfinite(w) or w < 0 for w in weights):
                raise ValueError(f"weights must be non-negative numbers, got {list(weights)}")
            self._expect_exits("weights", len(weights))
        self.weights = None if weights is None else [float(w) for w in weights]
        self.schedule = schedule
        self.depths = None if depths is None else [float(d) for d in depths]
        self.epochs = epochs
        # the same numbers as tensors that move with the loss (.to(device)); not saved: the arguments rebuild them
        self.register_buffer("weight_values", None if weights is None else torch.tensor(self.weights), persistent=False)
        self.register_buffer("depth_values", None if depths is None else torch.tensor(self.depths), persistent=False)

    def _expect_exits(self, name: str, n: int) -> None:
        if self.num_exits is not None and self.num_exits != n:
            raise ValueError(f"{name} implies {n} exits but num_exits={self.num_exits}")
        self.num_exits = n
        self.exits_from = f"{name} has {n} entries, one per exit"

    def current_weights(self, num_exits: int) -> list[float]:
        """The per-exit weights in use now (for the SDN ramp: at the current epoch)."""
        if self.schedule is None:
            return self.weights or [1.0] * num_exits
        depths = self.depths or [i / num_exits for i in range(1, num_exits)]
        e = int(self.epoch) + 1
        return [min(c, 0.01 + e * c / self.epochs) for c in depths] + [1.0]

    def _weights(self, num_exits: int, device: torch.device) -> torch.Tensor:
        # `current_weights` on the device, from buffers: no host read (a compiled loss stays one
        # graph) and no copy from the host (on a GPU each is a wait)
        if self.schedule is None:
            return torch.ones(num_exits, device=device) if self.weight_values is None else self.weight_values.to(device)
        if self.depth_values is None:
            depths = torch.arange(1, num_exits, device=device, dtype=torch.float32) / num_exits
        else:
            depths = self.depth_values.to(device)
        e = self.epoch.to(device) + 1
        ramp = torch.minimum(depths, 0.01 + e * depths / self.epochs)
        return torch.cat([ramp, ramp.new_ones(1)])

    def objective(self, logits, features, target):
        ce = torch.stack([self.supervised(z, target) for z in logits])
        w = self._weights(len(logits), ce.device)
        loss = (w * ce).sum()
        self._record(ce=ce, weight=w)
        return loss

    def extra_repr(self) -> str:
        if self.schedule == "sdn":
            return self._repr(schedule="sdn", depths=self.depths, epochs=self.epochs)
        return self._repr(weights=self.weights)
