"""Multi-exit training objectives: one loss class per published method, their shared base in `objective.py`.

Every loss is an ``nn.Module`` called as ``loss_fn(outputs, target)`` with the per-exit logits a
`MultiExitModel` returns (shallow to deep, the last is the backbone's head), or the `ExitOutputs`
of ``model(x, return_features=True)`` when a feature term is on. ``target`` is ``(B,)`` class
indices (``ignore_index`` marks unlabeled samples) or ``(B, C)`` soft targets (mixup / cutmix).

Notation of the docstrings (and of ``docs/losses.md``): z_i the logits of exit i = 1..N, f_i its
pooled feature, sg the stop-gradient, KD_T(p, z) = T^2 KL(p || softmax(z / T)), summed over
classes and averaged over the batch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .objective import MultiExitLoss, check_fraction, check_positive, feature_adapters, kd_loss, kd_matrix, soft

__all__ = [
    "MultiExitLoss",
    "MultiExitCELoss",
    "DistillationBasedLoss",
    "ExitEnsembleLoss",
    "SelfDistillationLoss",
    "MultiSelfDistillationLoss",
    "AppropriateTeachersLoss",
    "EnsembleKnowledgeDistillationLoss",
    "kd_loss",
]


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

    def __init__(self, weights: Sequence[float] | None = None, schedule: str | None = None, depths: Sequence[float] | None = None, epochs: int | None = None, **kwargs):
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
                raise ValueError("depths set the SDN schedule's C_i: give schedule='sdn' (and epochs) with them, or fixed weights without them")
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
        depths = torch.arange(1, num_exits, device=device, dtype=torch.float32) / num_exits if self.depth_values is None else self.depth_values.to(device)
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

    def __init__(self, C: float = 0.5, temperature: float | str = "adaptive", t_mult: float = 1.05, maxprob: float = 0.5, t_squared: bool = True,
                 scale: float = 1.0, **kwargs):
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
            raise ValueError(f"t_mult must be >= 1: the adaptive temperature only grows (T *= t_mult when the teacher is sure), got {t_mult!r}")
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
        t = f"adaptive(start=1.0, t_mult={self.t_mult}, maxprob={self.maxprob}, now={float(self.temperature):.4g})" if self.adaptive else float(self.temperature)
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

    def __init__(self, distance: str = "mse", temperature: float = 3.0, kl_weight: float = 0.1, feature_weight: float = 0.0, feature_dims: Sequence[int] | None = None, t_squared: bool = True, **kwargs):
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
        self.hint_exits = None if hint_exits is None else sorted(set(int(k) for k in hint_exits))
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

    def __init__(self, alpha: float = 0.3, temperature: float = 3.0, feature_weight: float = 0.0, feature_dims: Sequence[int] | None = None, t_squared: bool = True,
                 **kwargs):
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
        return self._repr(alpha=self.alpha, temperature=self.temperature, feature_weight=self.feature_weight, t_squared=self.t_squared, **hints)


class MultiSelfDistillationLoss(_HintLoss):
    """Multi-self-distillation (Luan et al. 2019, MSD): every exit learns from every other.

    loss = (1 - a) sum_i CE(z_i) + a / (N - 1) sum_i sum_{j != i} KD_T(sg softmax(z_j / T), z_i)
           + b(e) sum_{i<N} ||f_i - sg f_N||^2,   b(e) = b 0.5 (1 + cos(pi e / epochs))

    The authors' code is not public; the defaults (a = 0.5, T = 3, b = 0) are this library's.
    ``epochs`` sets the cosine annealing of the hint weight b over training (call
    ``set_epoch(epoch)`` each epoch); without it b stays constant.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 3.0, feature_weight: float = 0.0, epochs: int | None = None, feature_dims: Sequence[int] | None = None, t_squared: bool = True, **kwargs):
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
        return self._repr(alpha=self.alpha, temperature=self.temperature, feature_weight=self.feature_weight, epochs=self.epochs, t_squared=self.t_squared)


class AppropriateTeachersLoss(MultiExitLoss):
    """Multi-exit self-distillation with appropriate teachers (Sun et al., FITEE 2024, MATE) — this library's reading.

    N ensemble teachers t_k = sum_j softmax(theta_k)_j sg(z_j), k = 1..N, with trainable weights
    theta (an N x N parameter of the loss), each trained with CE. Exit i learns from all teachers,
    mostly from its primary teacher t_i:

    loss = sum_i [CE(z_i) + sum_k g_ik KD_T(sg softmax(t_k / T), z_i)] + sum_k CE(t_k),
    g_ii = lam, g_ik = (1 - lam) / (N - 1) for k != i.

    The paper's full text is not public; this reading of its abstract is ours. Choices it does not
    settle: the teachers combine the detached exits, so their CE trains only theta; teacher k
    starts centred on exit k (theta_kk = ``primary_init``, others 0), so the teachers differ
    from the first step and exit i's primary teacher starts at its own level. Defaults lam = 0.5,
    T = 3. Hand the loss's parameters to the optimizer: ``optim(list(model.parameters()) +
    list(loss_fn.parameters()))``.
    """

    min_exits = 2

    def __init__(self, num_exits: int, lam: float = 0.5, temperature: float = 3.0, primary_init: float = 1.0, t_squared: bool = True, **kwargs):
        if num_exits is None:
            raise ValueError("AppropriateTeachersLoss needs num_exits (model.num_exits): it holds N teachers' weights")
        super().__init__(num_exits=num_exits, **kwargs)
        check_fraction("lam", lam)
        check_positive("temperature", temperature)
        self.lam = float(lam)
        self.temperature = float(temperature)
        self.t_squared = t_squared
        self.theta = nn.Parameter(torch.eye(num_exits) * float(primary_init))

    def teachers(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """The N teachers' logits, ``(N, B, C)``: teacher k is sum_j softmax(theta_k)_j sg(z_j)."""
        stacked = torch.stack([z.detach().float() for z in logits])  # (N, B, C)
        return torch.einsum("kj,jbc->kbc", self.theta.softmax(dim=1).to(stacked.device), stacked)

    def objective(self, logits, features, target):
        T = self.temperature
        t = self.teachers(logits)
        teacher_ce = torch.stack([self.supervised(tk, target) for tk in t])
        ce = torch.stack([self.supervised(z, target) for z in logits])
        n = len(logits)
        gates = torch.full((n, n), (1.0 - self.lam) / (n - 1), device=ce.device).fill_diagonal_(self.lam)
        distill = (gates * kd_matrix(logits, soft(t, T), T, self.t_squared)).sum(1)
        loss = ce.sum() + distill.sum() + teacher_ce.sum()
        self._record(ce=ce, distill=distill, teacher_ce=teacher_ce)
        return loss

    def extra_repr(self) -> str:
        return self._repr(lam=self.lam, temperature=self.temperature, t_squared=self.t_squared)


class EnsembleKnowledgeDistillationLoss(MultiExitLoss):
    """Ensemble knowledge distillation (Asif et al., ECAI 2020, EKD): external teachers, one per exit.

    loss = sum_i [(1 - a) CE(z_i) + a KD_T(softmax(t_pi(i) / T), z_i)] + CE(mean_i z_i)

    Called as ``loss_fn(outputs, target, teacher_logits)`` with the teachers' ``(B, C)`` logits
    (a list, or one tensor for a single teacher), computed by the caller (under ``no_grad``; they
    are detached here anyway). Exit i learns from teacher ``assignment[i]``; by default teacher i
    when there are as many teachers as exits, the one teacher when there is one. The last term
    couples the branches through their ensemble. The defaults a = 0.5, T = 3 are this library's
    (the paper gives no code).
    """

    min_exits = 1

    def __init__(self, alpha: float = 0.5, temperature: float = 3.0, assignment: Sequence[int] | None = None, ensemble_weight: float = 1.0, t_squared: bool = True, **kwargs):
        super().__init__(**kwargs)
        check_fraction("alpha", alpha)
        check_positive("temperature", temperature)
        check_positive("ensemble_weight", ensemble_weight, allow_zero=True)
        if assignment is not None:
            assignment = [int(a) for a in assignment]
            if any(a < 0 for a in assignment):
                raise ValueError(f"assignment must hold teacher indices >= 0, got {assignment}")
            if self.num_exits is not None and len(assignment) != self.num_exits:
                raise ValueError(f"assignment has {len(assignment)} entries but num_exits={self.num_exits}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.assignment = assignment
        self.ensemble_weight = float(ensemble_weight)
        self.t_squared = t_squared

    def forward(self, outputs, target: torch.Tensor, teacher_logits=None) -> torch.Tensor:
        logits, _ = self._unpack(outputs)
        target = self._check_target(target, logits[0])
        if teacher_logits is None:
            raise TypeError("EnsembleKnowledgeDistillationLoss needs the teachers' logits: loss_fn(outputs, target, teacher_logits)")
        if isinstance(teacher_logits, nn.Module) or (isinstance(teacher_logits, (list, tuple)) and any(isinstance(t, nn.Module) for t in teacher_logits)):
            raise TypeError(
                "teacher_logits takes the teachers' logits, not the teacher models: compute them first, "
                "e.g. with torch.no_grad(): teacher_logits = [teacher(x) for teacher in teachers]"
            )
        teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
        for k, t in enumerate(teachers):
            if not isinstance(t, torch.Tensor) or t.shape != logits[0].shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"teacher_logits[{k}] must have the exits' logits shape (B, C) = {tuple(logits[0].shape)}, got {got}")
        return self.objective(logits, self._assign(len(logits), teachers), target)

    def _assign(self, n: int, teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        m = len(teachers)
        if self.assignment is not None:
            if len(self.assignment) != n:
                raise ValueError(f"assignment has {len(self.assignment)} entries but outputs holds {n} exits")
            if max(self.assignment) >= m:
                raise ValueError(f"assignment refers to teacher {max(self.assignment)} but {m} teacher logits were given")
            return [teachers[a] for a in self.assignment]
        if m == n:
            return teachers
        if m == 1:
            return teachers * n
        raise ValueError(f"{m} teachers for {n} exits: give one teacher per exit, a single teacher, or assignment=[teacher index per exit]")

    def objective(self, logits, teachers, target):
        T = self.temperature
        ce = torch.stack([self.supervised(z, target) for z in logits])
        distill = torch.stack([kd_loss(z, soft(t, T), T, self.t_squared) for z, t in zip(logits, teachers)])
        ensemble_ce = self.supervised(torch.stack(logits).float().mean(0), target)
        loss = (1.0 - self.alpha) * ce.sum() + self.alpha * distill.sum() + self.ensemble_weight * ensemble_ce
        self._record(ce=ce, distill=distill, ensemble_ce=ensemble_ce)
        return loss

    def extra_repr(self) -> str:
        return self._repr(alpha=self.alpha, temperature=self.temperature, assignment=self.assignment, ensemble_weight=self.ensemble_weight, t_squared=self.t_squared)


def __getattr__(name: str):
    # the factory lived here before presets.py took it with the authors' configurations
    if name in ("create_loss", "loss_names"):
        from . import presets  # lazy: presets imports this module

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
