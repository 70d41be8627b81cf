"""Self-distillation with a feature term (hints): Be Your Own Teacher and Multi-Self-Distillation.

Notation as in `timm_exits.losses.distillation`: z_i the logits of exit i = 1..N, f_i its pooled
feature, sg the stop-gradient, KD_T(p, z) = T^2 KL(p || softmax(z / T)).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import MultiExitLoss, check_fraction, check_positive, feature_adapters, kd_loss, kd_matrix, soft

__all__ = ["SelfDistillationLoss", "MultiSelfDistillationLoss"]


class _HintLoss(MultiExitLoss):
    """Shared by BYOT and MSD: KD at temperature T plus an L2 hint from each early feature to the final one."""

    min_exits = 2

    FEATURE_DISTANCES = ("mse", "l2")

    def __init__(self, alpha: float, temperature: float, feature_weight: float, feature_dims, t_squared: bool,
                 feature_distance: str = "mse", hint_exits: Sequence[int] | None = None, linear_adapters: bool = False, **kwargs):
        super().__init__(**kwargs)
        check_fraction("alpha", alpha)
        check_positive("temperature", temperature)
        check_positive("feature_weight", feature_weight, allow_zero=True)
        if feature_distance not in self.FEATURE_DISTANCES:
            raise ValueError(f"feature_distance must be one of {self.FEATURE_DISTANCES}, got {feature_distance!r}")
        if hint_exits is not None and any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in hint_exits):
            raise ValueError(f"hint_exits must list early-exit indices (0 = the shallowest), got {hint_exits!r}")
        if linear_adapters and feature_dims is None:
            raise ValueError("linear_adapters=True needs feature_dims, each exit's feature width, to build the adapters")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.feature_weight = float(feature_weight)
        self.t_squared = t_squared
        self.feature_distance = feature_distance
        self.hint_exits = None if hint_exits is None else sorted({int(k) for k in hint_exits})
        self.adapters = feature_adapters(feature_dims, always_linear=linear_adapters)

    def hints(self, features, n: int) -> torch.Tensor:
        """For each early exit i: ``||f_i - sg f_N||^2`` averaged over batch and width (``"mse"``), or the
        plain L2 norm over the whole ``(B, D)`` difference (``"l2"``, BYOT's released ``torch.dist``);
        zero for an exit outside `hint_exits`."""
        f = self._aligned_features(features, n, self.adapters)
        final = f[-1].detach().float()
        if self.hint_exits is not None and self.hint_exits and self.hint_exits[-1] >= n - 1:
            raise ValueError(f"hint_exits={self.hint_exits} names early exits that do not exist: there are {n - 1}")
        chosen = range(n - 1) if self.hint_exits is None else self.hint_exits
        distance = F.mse_loss if self.feature_distance == "mse" else torch.dist
        per_exit = [final.new_zeros(()) for _ in range(n - 1)]
        for k in chosen:
            per_exit[k] = distance(f[k].float(), final)
        return torch.stack(per_exit)


class SelfDistillationLoss(_HintLoss):
    """Be Your Own Teacher (Zhang et al., ICCV 2019, BYOT): the deepest exit teaches the shallower ones.

    loss = CE(z_N) + sum_{i<N} [(1 - a) CE(z_i) + a KD_T(sg softmax(z_N / T), z_i)] + b sum_{i<N} ||f_i - sg f_N||^2

    Defaults from the authors' released code (ArchipLab-LinfengZhang/pytorch-self-distillation-final,
    ``train.py``): a = 0.3, T = 3, and the deepest exit's CE at full weight (the paper writes
    (1 - a) on every exit's CE). That code has no T^2 on the KD term, and its feature term is
    ``0.03 ||A_i f_i - sg f_N||_2``: a plain L2 norm over the whole (B, D) batch (``torch.dist``,
    not squared, not averaged) through a trainable ``Linear`` adapter A_i per early exit, on every
    early exit but the deepest. ``create_loss("byot", preset="authors", feature_dims=...)`` gives
    exactly that (``t_squared=False, feature_weight=0.03, feature_distance="l2", hint_exits=[0..N-3],
    linear_adapters=True``). The default here is the paper's form without a feature term (b = 0);
    a hint needs features of the final width: BYOT's own bottleneck heads (``head="bottleneck"``)
    give them, other heads need ``feature_dims`` for adapters.
    """

    def __init__(self, alpha: float = 0.3, temperature: float = 3.0, feature_weight: float = 0.0,
                 feature_dims: Sequence[int] | None = None, t_squared: bool = True, **kwargs):
        super().__init__(alpha, temperature, feature_weight, feature_dims, t_squared, **kwargs)

    def objective(self, logits, features, target):
        T = self.temperature
        teacher = soft(logits[-1], T)
        ce = torch.stack([self.supervised(z, target) for z in logits])
        distill = torch.stack([kd_loss(z, teacher, T, self.t_squared) for z in logits[:-1]] + [ce.new_zeros(())])
        ce_weight = torch.full_like(ce, 1.0 - self.alpha)
        ce_weight[-1] = 1.0
        loss = (ce_weight * ce).sum() + self.alpha * distill.sum()
        terms = dict(ce=ce, distill=distill)
        if self.feature_weight:
            hint = self.hints(features, len(logits))
            loss = loss + self.feature_weight * hint.sum()
            terms["feature"] = hint
        self._record(**terms)
        return loss

    def extra_repr(self) -> str:
        hints = dict(feature_distance=self.feature_distance, hint_exits=self.hint_exits) if self.feature_weight else {}
        return self._repr(alpha=self.alpha, temperature=self.temperature, feature_weight=self.feature_weight, t_squared=self.t_squared,
                          **hints)


class MultiSelfDistillationLoss(_HintLoss):
    """Multi-self-distillation (Luan et al. 2019, MSD): every exit learns from every other.

    loss = (1 - a) sum_i CE(z_i) + a / (N - 1) sum_i sum_{j != i} KD_T(sg softmax(z_j / T), z_i)
           + b(e) sum_{i<N} ||f_i - sg f_N||^2,   b(e) = b 0.5 (1 + cos(pi e / epochs))

    The authors' code is not public; the defaults (a = 0.5, T = 3, b = 0) are this library's.
    ``epochs`` sets the cosine annealing of the hint weight b over training (call
    ``set_epoch(epoch)`` each epoch); without it b stays constant.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 3.0, feature_weight: float = 0.0, epochs: int | None = None,
                 feature_dims: Sequence[int] | None = None, t_squared: bool = True, **kwargs):
        super().__init__(alpha, temperature, feature_weight, feature_dims, t_squared, **kwargs)
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be a positive int (or None for a constant hint weight), got {epochs!r}")
        self.epochs = epochs

    def current_feature_weight(self) -> float:
        """b(e): the hint weight at the current epoch."""
        if self.epochs is None:
            return self.feature_weight
        progress = min(int(self.epoch), self.epochs) / self.epochs
        return self.feature_weight * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _feature_weight(self, device: torch.device) -> torch.Tensor | float:
        # `current_feature_weight` from the epoch buffer where it lives (see `MultiExitCELoss._weights`)
        if self.epochs is None:
            return self.feature_weight
        progress = self.epoch.to(device).clamp_max(self.epochs).float() / self.epochs
        return self.feature_weight * 0.5 * (1.0 + torch.cos(math.pi * progress))

    def objective(self, logits, features, target):
        T = self.temperature
        n = len(logits)
        teachers = torch.stack([soft(z, T) for z in logits])
        ce = torch.stack([self.supervised(z, target) for z in logits])
        pairs = kd_matrix(logits, teachers, T, self.t_squared)  # (student, teacher); the diagonal is zero
        distill = (pairs.sum(1) - pairs.diagonal()) / (n - 1)
        loss = (1.0 - self.alpha) * ce.sum() + self.alpha * distill.sum()
        terms = dict(ce=ce, distill=distill)
        b = self._feature_weight(ce.device)
        if self.feature_weight:
            hint = self.hints(features, n)
            loss = loss + b * hint.sum()
            terms["feature"], terms["feature_weight"] = hint, b  # not dict.update: torch < 2.6's dynamo breaks the graph on it
        self._record(**terms)
        return loss

    def extra_repr(self) -> str:
        return self._repr(alpha=self.alpha, temperature=self.temperature, feature_weight=self.feature_weight, epochs=self.epochs,
                          t_squared=self.t_squared)
