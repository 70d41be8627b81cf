"""Multi-exit training objectives: one loss class per published method, one shared base.

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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ensemble import check_logits

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


def kd_loss(student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float, t_squared: bool = True) -> torch.Tensor:
    """T^2 KL(teacher_probs || softmax(student / T)), summed over classes, averaged over the batch.

    KL rather than the soft cross entropy some authors' code uses: the gradient is the same (they
    differ by the teacher's entropy, a constant), and a student equal to its teacher costs zero.
    """
    log_q = F.log_softmax(student.float() / temperature, dim=1)
    kl = F.kl_div(log_q, teacher_probs.float(), reduction="batchmean")
    return kl * temperature**2 if t_squared else kl


def kd_matrix(students: list[torch.Tensor], teacher_probs: torch.Tensor, temperature: float, t_squared: bool = True) -> torch.Tensor:
    """``(N, M)``: entry (i, k) is `kd_loss` of student i against teacher k, all pairs in one contraction.

    KL(p_k || q_i) = sum p_k log p_k - sum p_k log q_i, so the pairs need one ``einsum`` rather
    than N * M separate calls (which cost more than the arithmetic at classification sizes).
    """
    log_q = torch.stack([F.log_softmax(z.float() / temperature, dim=1) for z in students])  # (N, B, C)
    p = teacher_probs.float()  # (M, B, C)
    batch = p.shape[1]
    neg_entropy = torch.special.xlogy(p, p).sum(dim=(1, 2))  # (M,)
    cross = torch.einsum("kbc,ibc->ik", p, log_q)  # (N, M)
    kl = (neg_entropy.unsqueeze(0) - cross) / batch
    return kl * temperature**2 if t_squared else kl


def soft(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The detached teacher distribution softmax(sg(z) / T)."""
    return F.softmax(logits.detach().float() / temperature, dim=-1)


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _check_fraction(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


class MultiExitLoss(nn.Module):
    """The base of every multi-exit loss: checks its inputs, computes the supervised term, keeps components.

    Args:
        num_exits: the number of exits the loss is built for; ``None`` accepts any number (losses
            with trainable state per exit need it).
        base_loss: the supervised loss ``(logits, target) -> scalar``; default cross entropy
            (which takes class indices and soft targets). Pass timm's ``SoftTargetCrossEntropy``
            or ``LabelSmoothingCrossEntropy`` to use those.
        label_smoothing: label smoothing of the default cross entropy.
        ignore_index: the class index of unlabeled samples; they add no supervised term.

    After each call ``loss_fn.components`` holds the last step's terms as detached tensors
    (``"ce"``: per-exit supervised loss, ``"distill"``: per-exit distillation, and so on) and
    ``loss_fn.log_dict()`` flattens them to floats for a logger.
    """

    min_exits = 1

    def __init__(self, num_exits: int | None = None, base_loss: Callable | None = None, label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        if num_exits is not None and (not isinstance(num_exits, int) or isinstance(num_exits, bool) or num_exits < self.min_exits):
            raise ValueError(f"num_exits must be an int >= {self.min_exits} (or None for any), got {num_exits!r}")
        if base_loss is not None and not callable(base_loss):
            raise TypeError(f"base_loss must be a callable (logits, target) -> loss, got {type(base_loss).__name__}")
        _check_fraction("label_smoothing", label_smoothing)
        self.num_exits = num_exits
        self.base_loss = base_loss
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index
        self.components: dict[str, torch.Tensor] = {}
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    # -- inputs -----------------------------------------------------------------------------------

    def _unpack(self, outputs) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        logits = check_logits(outputs)
        features = getattr(outputs, "features", None)
        n = len(logits)
        if self.num_exits is not None and n != self.num_exits:
            raise ValueError(f"{type(self).__name__} was built for num_exits={self.num_exits} but outputs holds {n} exits")
        if n < self.min_exits:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_exits} exits, outputs holds {n}")
        return logits, features

    def _check_target(self, target, logits: torch.Tensor) -> torch.Tensor:
        batch, classes = logits.shape
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a tensor of (B,) class indices or (B, C) soft targets, got {type(target).__name__}")
        if target.dim() == 1 and not target.dtype.is_floating_point:
            if len(target) != batch:
                raise ValueError(f"target has {len(target)} labels but the exits' logits have batch size {batch}")
            return target
        if target.dim() == 2 and target.dtype.is_floating_point:
            if target.shape != (batch, classes):
                raise ValueError(f"soft target must have the logits' shape (B, C) = {(batch, classes)}, got {tuple(target.shape)}")
            rows = target.float().sum(1)
            if bool((target < 0).any()) or not torch.allclose(rows, torch.ones_like(rows), atol=1e-3):
                raise ValueError(
                    "soft target rows must be probability distributions (non-negative, summing to 1); "
                    f"row sums range over [{rows.min().item():.4f}, {rows.max().item():.4f}]"
                )
            return target
        raise ValueError(
            f"target must be (B,) integer class indices or (B, C) float soft targets, got shape {tuple(target.shape)} of {target.dtype}"
        )

    def _aligned_features(self, features, n: int, adapters: nn.ModuleList | None) -> list[torch.Tensor]:
        """Each exit's pooled feature at the final exit's width (through `adapters` where given)."""
        if features is None:
            raise ValueError(
                f"{type(self).__name__} has a feature term on: call it with model(x, return_features=True) "
                "(an ExitOutputs with logits and features), or set its feature weight to 0"
            )
        if len(features) != n:
            raise ValueError(f"outputs holds {n} logits but {len(features)} features")
        features = [f.flatten(1) for f in features]
        widths = [f.shape[1] for f in features]
        if adapters is None:
            if len(set(widths)) > 1:
                raise ValueError(
                    f"the exits' features have widths {widths}; a feature term compares them at the final exit's width ({widths[-1]}). "
                    f"Pass feature_dims={widths} so the loss builds linear adapters (then give the loss's parameters to the "
                    "optimizer), or use heads that output the final width (head='bottleneck' or 'replica')"
                )
            return features
        expected = [a.in_features if isinstance(a, nn.Linear) else widths[-1] for a in adapters] + [widths[-1]]
        if widths != expected:
            raise ValueError(f"the loss was built with feature_dims={expected} but the exits' features have widths {widths}")
        return [a(f) for a, f in zip(adapters, features[:-1])] + [features[-1]]

    # -- terms ------------------------------------------------------------------------------------

    def supervised(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The base loss of one exit; unlabeled samples (``ignore_index``) add nothing to it."""
        if target.dtype.is_floating_point:
            if self.base_loss is not None:
                return self.base_loss(logits, target)
            return F.cross_entropy(logits.float(), target.float(), label_smoothing=self.label_smoothing)
        labeled = target != self.ignore_index
        if self.base_loss is None:
            # the mean over labeled samples, without a host sync; zero when none is labeled
            per_sample = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, reduction="none")
            return per_sample.sum() / labeled.sum().clamp_min(1)
        if bool(labeled.all()):
            return self.base_loss(logits, target)
        if not bool(labeled.any()):
            return logits.sum() * 0.0
        return self.base_loss(logits[labeled], target[labeled])

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        logits, features = self._unpack(outputs)
        target = self._check_target(target, logits[0])
        return self.objective(logits, features, target)

    def objective(self, logits: list[torch.Tensor], features: list[torch.Tensor] | None, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _record(self, **terms) -> None:
        self.components = {k: (v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in terms.items()}

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        """The last step's components as floats: ``{"ce/exit1": ..., "distill/exit1": ..., "temperature": ...}``."""
        out = {}
        for name, value in self.components.items():
            if value.dim() == 0:
                out[f"{prefix}{name}"] = value.item()
            else:
                out.update({f"{prefix}{name}/exit{i + 1}": v for i, v in enumerate(value.tolist())})
        return out

    # -- schedules --------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch starts (0-based, as timm's loop counts); per-epoch schedules read it."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch.fill_(epoch)

    def _base_repr(self) -> str:
        parts = [f"num_exits={self.num_exits}"] if self.num_exits is not None else []
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.base_loss is not None:
            parts.append(f"base_loss={getattr(self.base_loss, '__name__', type(self.base_loss).__name__)}")
        return ", ".join(parts)

    def _repr(self, **hyper) -> str:
        base = self._base_repr()
        own = ", ".join(f"{k}={v!r}" for k, v in hyper.items())
        return ", ".join(p for p in (own, base) if p)


def feature_adapters(feature_dims: Sequence[int] | None) -> nn.ModuleList | None:
    """Linear maps from each early exit's feature width to the final exit's (identity where equal)."""
    if feature_dims is None:
        return None
    dims = [int(d) for d in feature_dims]
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"feature_dims must list each exit's feature width (>= 2 exits, positive), got {feature_dims!r}")
    return nn.ModuleList([nn.Identity() if d == dims[-1] else nn.Linear(d, dims[-1]) for d in dims[:-1]])


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

    def _expect_exits(self, name: str, n: int) -> None:
        if self.num_exits is not None and self.num_exits != n:
            raise ValueError(f"{name} implies {n} exits but num_exits={self.num_exits}")
        self.num_exits = n

    def current_weights(self, num_exits: int) -> list[float]:
        """The per-exit weights in use now (for the SDN ramp: at the current epoch)."""
        if self.schedule is None:
            return self.weights or [1.0] * num_exits
        depths = self.depths or [i / num_exits for i in range(1, num_exits)]
        e = int(self.epoch) + 1
        return [min(c, 0.01 + e * c / self.epochs) for c in depths] + [1.0]

    def objective(self, logits, features, target):
        ce = torch.stack([self.supervised(z, target) for z in logits])
        w = torch.tensor(self.current_weights(len(logits)), device=ce.device)
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

    Samples whose label is ``ignore_index`` add only the distillation term (the paper's
    semi-supervised extension): the CE averages over labeled samples, the KD over all.
    The temperature is a buffer (it survives ``state_dict()``) and is only updated while the loss
    is in training mode with gradients enabled, so a validation pass does not move it.
    The authors' code uses the soft cross entropy -sum p log q for the KD term; KL has the same
    gradient (see `kd_loss`).
    """

    min_exits = 2

    def __init__(self, C: float = 0.5, temperature: float | str = "adaptive", t_mult: float = 1.05, maxprob: float = 0.5, t_squared: bool = True, **kwargs):
        super().__init__(**kwargs)
        _check_fraction("C", C)
        adaptive = temperature == "adaptive"
        if not adaptive:
            if isinstance(temperature, str):
                raise ValueError(f"temperature must be 'adaptive' or a positive number, got {temperature!r}")
            _check_positive("temperature", temperature)
        _check_positive("t_mult", t_mult)
        _check_fraction("maxprob", maxprob)
        self.C = float(C)
        self.adaptive = adaptive
        self.t_mult = float(t_mult)
        self.maxprob = float(maxprob)
        self.t_squared = t_squared
        self.register_buffer("temperature", torch.tensor(1.0 if adaptive else float(temperature), dtype=torch.float64))

    def objective(self, logits, features, target):
        T = float(self.temperature)
        teacher = soft(logits[-1], T)
        ce = torch.stack([self.supervised(z, target) for z in logits])
        distill = torch.stack([kd_loss(z, teacher, T, self.t_squared) for z in logits[:-1]] + [ce.new_zeros(())])
        loss = (1.0 - self.C) * ce.sum() + self.C * distill.sum()
        teacher_maxprob = teacher.max(dim=1).values.mean()
        self._record(ce=ce, distill=distill, temperature=T, teacher_maxprob=teacher_maxprob)
        if self.adaptive and self.training and torch.is_grad_enabled() and float(teacher_maxprob) > self.maxprob:
            self.temperature.mul_(self.t_mult)
        return loss

    def extra_repr(self) -> str:
        t = f"adaptive(start=1.0, t_mult={self.t_mult}, maxprob={self.maxprob}, now={float(self.temperature):.4g})" if self.adaptive else float(self.temperature)
        return self._repr(C=self.C, temperature=t, t_squared=self.t_squared)


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
        _check_positive("temperature", temperature)
        _check_positive("kl_weight", kl_weight, allow_zero=True)
        _check_positive("feature_weight", feature_weight, allow_zero=True)
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

    def __init__(self, alpha: float, temperature: float, feature_weight: float, feature_dims, t_squared: bool, **kwargs):
        super().__init__(**kwargs)
        _check_fraction("alpha", alpha)
        _check_positive("temperature", temperature)
        _check_positive("feature_weight", feature_weight, allow_zero=True)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.feature_weight = float(feature_weight)
        self.t_squared = t_squared
        self.adapters = feature_adapters(feature_dims)

    def hints(self, features, n: int) -> torch.Tensor:
        """||f_i - sg f_N||^2 (mean over batch and width) for each early exit i."""
        f = self._aligned_features(features, n, self.adapters)
        final = f[-1].detach().float()
        return torch.stack([F.mse_loss(x.float(), final) for x in f[:-1]])


class SelfDistillationLoss(_HintLoss):
    """Be Your Own Teacher (Zhang et al., ICCV 2019, BYOT): the deepest exit teaches the shallower ones.

    loss = CE(z_N) + sum_{i<N} [(1 - a) CE(z_i) + a KD_T(sg softmax(z_N / T), z_i)] + b sum_{i<N} ||f_i - sg f_N||^2

    Defaults from the authors' released code: a = 0.3, T = 3, and the deepest exit's CE at full
    weight (the paper writes (1 - a) on every exit's CE). That code has no T^2 factor on the KD
    term and no feature term: pass ``t_squared=False`` to match it exactly. The paper's hint term
    (weight b, default 0 here) needs features of the final width: BYOT's own bottleneck heads
    (``head="bottleneck"``) give them, other heads need ``feature_dims`` for adapters.
    """

    def __init__(self, alpha: float = 0.3, temperature: float = 3.0, feature_weight: float = 0.0, feature_dims: Sequence[int] | None = None, t_squared: bool = True, **kwargs):
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
        return self._repr(alpha=self.alpha, temperature=self.temperature, feature_weight=self.feature_weight, t_squared=self.t_squared)


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

    def objective(self, logits, features, target):
        T = self.temperature
        n = len(logits)
        teachers = torch.stack([soft(z, T) for z in logits])
        ce = torch.stack([self.supervised(z, target) for z in logits])
        pairs = kd_matrix(logits, teachers, T, self.t_squared)  # (student, teacher); the diagonal is zero
        distill = (pairs.sum(1) - pairs.diagonal()) / (n - 1)
        loss = (1.0 - self.alpha) * ce.sum() + self.alpha * distill.sum()
        terms = dict(ce=ce, distill=distill)
        b = self.current_feature_weight()
        if self.feature_weight:
            hint = self.hints(features, n)
            loss = loss + b * hint.sum()
            terms.update(feature=hint, feature_weight=b)
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
        _check_fraction("lam", lam)
        _check_positive("temperature", temperature)
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
        _check_fraction("alpha", alpha)
        _check_positive("temperature", temperature)
        _check_positive("ensemble_weight", ensemble_weight, allow_zero=True)
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


_LOSSES: dict[str, Callable[..., MultiExitLoss]] = {
    "ce": MultiExitCELoss,
    "sdn": lambda **kw: MultiExitCELoss(schedule="sdn", **kw),
    "distillation": DistillationBasedLoss,
    "eed": ExitEnsembleLoss,
    "byot": SelfDistillationLoss,
    "msd": MultiSelfDistillationLoss,
    "mate": AppropriateTeachersLoss,
    "ekd": EnsembleKnowledgeDistillationLoss,
}
_NEEDS_EPOCHS = ("sdn", "msd")


def loss_names() -> list[str]:
    """The short names `create_loss` accepts."""
    return list(_LOSSES)


def create_loss(name: str, num_exits: int | None = None, epochs: int | None = None, **kwargs) -> MultiExitLoss:
    """A loss by short name: ``ce``, ``sdn`` (SDN ramp), ``distillation`` (Phuong & Lampert), ``eed``,
    ``byot``, ``msd``, ``mate``, ``ekd``. `epochs` feeds the schedules of ``sdn`` and ``msd``."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {loss_names()}")
    if name in _NEEDS_EPOCHS:
        kwargs["epochs"] = epochs
    return _LOSSES[name](num_exits=num_exits, **kwargs)
