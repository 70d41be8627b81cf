"""Distillation between exits: the deepest exit teaches the others (Phuong & Lampert) or their ensemble teaches all (EED).

Notation of the docstrings (and of ``docs/losses.md``): z_i the logits of exit i = 1..N, f_i its
pooled feature, sg the stop-gradient, KD_T(p, z) = T^2 KL(p || softmax(z / T)), summed over
classes and averaged over the batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import MultiExitLoss, check_fraction, check_positive, feature_adapters, kd_loss, soft

__all__ = ["DistillationBasedLoss", "ExitEnsembleLoss"]



class DistillationBasedLoss(MultiExitLoss):
    """Distillation-based training (Phuong & Lampert, ICCV 2019): the final exit teaches the earlier ones.

    loss = (1 - C) CE(z_N) + sum_{i<N} [(1 - C) CE(z_i) + C KD_T(sg softmax(z_N / T), z_i)]

    Args:
        C: the distillation weight (the authors' runs: 0.5).
        temperature: ``"adaptive"`` (default) — T starts at 1 and is multiplied by ``t_mult``
            (1.05) after every training batch whose mean teacher max-probability at the current T
            exceeds ``maxprob`` (0.5), so T only grows; or a number for a fixed T (the authors'
            fixed variant used T = 4).
        t_squared: multiply the KD term by T^2 (the authors' code does).
        scale: a factor on the whole loss. The authors' CIFAR script multiplies by 2 * 5 / N
            (N exits; a learning-rate factor, 2.5 at four exits): ``preset="authors"`` sets it.

    Samples whose label is ``ignore_index`` add only the distillation term (the paper's
    semi-supervised extension): the CE averages over labeled samples, the KD over all.
    The temperature is a buffer (it survives ``state_dict()``) and is only updated while the loss
    is in training mode with gradients enabled, so a validation pass does not move it.
    The authors' code uses the soft cross entropy -sum p log q for the KD term; KL has the same
    gradient (see `kd_loss`).
    """

    min_exits = 2

    def __init__(self, C: float = 0.5, temperature: float | str = "adaptive", t_mult: float = 1.05, maxprob: float = 0.5,
                 t_squared: bool = True, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        check_fraction("C", C)
        check_positive("scale", scale)
        self.scale = float(scale)
        adaptive = temperature == "adaptive"
        if not adaptive:
            if isinstance(temperature, str):
                raise ValueError(f"temperature must be 'adaptive' or a positive number, got {temperature!r}")
            check_positive("temperature", temperature)
        check_positive("t_mult", t_mult)
        if t_mult < 1:
            raise ValueError(
                f"t_mult must be >= 1: the adaptive temperature only grows (T *= t_mult when the teacher is sure), got {t_mult!r}"
            )
        check_fraction("maxprob", maxprob)
        self.C = float(C)
        self.adaptive = adaptive
        self.t_mult = float(t_mult)
        self.maxprob = float(maxprob)
        self.t_squared = t_squared
        self.register_buffer("temperature", torch.tensor(1.0 if adaptive else float(temperature), dtype=torch.float64))

    def objective(self, logits, features, target):
        # a float32 copy of the buffer (which grows in place below): reading it into Python would be a host sync and a graph break
        T = self.temperature.to(logits[-1].device, torch.float32, copy=True)
        teacher = soft(logits[-1], T)
        ce = torch.stack([self.supervised(z, target) for z in logits])
        distill = torch.stack([kd_loss(z, teacher, T, self.t_squared) for z in logits[:-1]] + [ce.new_zeros(())])
        loss = self.scale * ((1.0 - self.C) * ce.sum() + self.C * distill.sum())
        teacher_maxprob = teacher.max(dim=1).values.mean()
        self._record(ce=ce, distill=distill, temperature=T, teacher_maxprob=teacher_maxprob)
        if self.adaptive and self.training and torch.is_grad_enabled():
            grow = (teacher_maxprob.detach() > self.maxprob).to(self.temperature.device, torch.float64)
            self.temperature.mul_(1.0 + (self.t_mult - 1.0) * grow)  # Python numbers: no tensor built from host data
        return loss

    def extra_repr(self) -> str:
        if self.adaptive:
            t = f"adaptive(start=1.0, t_mult={self.t_mult}, maxprob={self.maxprob}, now={float(self.temperature):.4g})"
        else:
            t = float(self.temperature)
        return self._repr(C=self.C, temperature=t, t_squared=self.t_squared, **({"scale": self.scale} if self.scale != 1.0 else {}))


class ExitEnsembleLoss(MultiExitLoss):
    """Exit-ensemble distillation (Lee & Lee 2021, EED): the exits' ensemble teaches every exit, the final one too.

    e = sg(mean_i z_i);  loss = sum_i CE(z_i) + sum_i D(z_i, e) [+ w_f sum_i masked-MSE(f_i, sg mean_j f_j)]

    Args:
        distance: ``"mse"`` — D = MSE between logits (mean over batch and classes; the authors'
            default) or ``"kl"`` — D = ``kl_weight`` KD_T(softmax(e / T), z_i) with T = 3 and
            weight 0.1.
        feature_weight: weight of the feature term; masked-MSE(f, t) = mean((f - t)^2 where
            f > 0 or t > 0). The authors' script turns it on (weight 1) for their ResNet whose
            exit branches all end at the final width; here it is off by default because it needs
            features of one width: use ``head="bottleneck"`` or give ``feature_dims`` for adapters.
        feature_dims: each exit's feature width, to build linear adapters to the final width.
    """

    min_exits = 2
    DISTANCES = ("mse", "kl")

    def __init__(self, distance: str = "mse", temperature: float = 3.0, kl_weight: float = 0.1,
                 feature_weight: float = 0.0, feature_dims: Sequence[int] | None = None, t_squared: bool = True, **kwargs):
        super().__init__(**kwargs)
        if distance not in self.DISTANCES:
            raise ValueError(f"distance must be one of {self.DISTANCES}, got {distance!r}")
        check_positive("temperature", temperature)
        check_positive("kl_weight", kl_weight, allow_zero=True)
        check_positive("feature_weight", feature_weight, allow_zero=True)
        self.distance = distance
        self.temperature = float(temperature)
        self.kl_weight = float(kl_weight)
        self.feature_weight = float(feature_weight)
        self.t_squared = t_squared
        self.adapters = feature_adapters(feature_dims)

    def objective(self, logits, features, target):
        ce = torch.stack([self.supervised(z, target) for z in logits])
        ensemble = torch.stack(logits).float().mean(0).detach()
        if self.distance == "mse":
            distill = torch.stack([F.mse_loss(z.float(), ensemble) for z in logits])
        else:
            teacher = soft(ensemble, self.temperature)
            distill = self.kl_weight * torch.stack([kd_loss(z, teacher, self.temperature, self.t_squared) for z in logits])
        loss = ce.sum() + distill.sum()
        terms = dict(ce=ce, distill=distill)
        if self.feature_weight:
            f = self._aligned_features(features, len(logits), self.adapters)
            target_f = torch.stack(f).float().mean(0).detach()
            feat = torch.stack([((x.float() - target_f) ** 2 * ((x > 0) | (target_f > 0))).mean() for x in f])
            loss = loss + self.feature_weight * feat.sum()
            terms["feature"] = feat
        self._record(**terms)
        return loss

    def extra_repr(self) -> str:
        hyper = dict(distance=self.distance)
        if self.distance == "kl":
            hyper.update(temperature=self.temperature, kl_weight=self.kl_weight, t_squared=self.t_squared)
        hyper["feature_weight"] = self.feature_weight
        return self._repr(**hyper)


