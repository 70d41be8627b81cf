"""The base of every multi-exit loss: input checks, the supervised term, distillation at a temperature.

The loss classes themselves live in `timm_exits.losses`; this module holds what they share.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ensemble import check_logits

__all__ = ["MultiExitLoss", "kd_loss", "kd_matrix", "soft", "feature_adapters"]


def _compiling() -> bool:
    """Whether torch.compile is tracing this call."""
    return torch.compiler.is_compiling()


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


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def check_fraction(name: str, value) -> None:
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

    def __init__(self, num_exits: int | None = None, base_loss: Callable | None = None,
                 label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        if num_exits is not None and (not isinstance(num_exits, int) or isinstance(num_exits, bool) or num_exits < self.min_exits):
            raise ValueError(f"num_exits must be an int >= {self.min_exits} (or None for any), got {num_exits!r}")
        if base_loss is not None and not callable(base_loss):
            raise TypeError(f"base_loss must be a callable (logits, target) -> loss, got {type(base_loss).__name__}")
        check_fraction("label_smoothing", label_smoothing)
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
            built = getattr(self, "exits_from", None)  # the argument that fixed the number of exits, when not num_exits
            if built:
                raise ValueError(f"{type(self).__name__}: {built}, but outputs holds {n} exits")
            raise ValueError(f"{type(self).__name__} was built for num_exits={self.num_exits} but outputs holds {n} exits")
        if n < self.min_exits:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_exits} exits, outputs holds {n}")
        return logits, features

    def _check_target(self, target, logits: torch.Tensor) -> torch.Tensor:
        batch, classes = logits.shape
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a tensor of (B,) class indices or (B, C) soft targets, got {type(target).__name__}")
        if batch == 0:
            raise ValueError("the batch is empty (the exits' logits have batch size 0): there is no loss to compute; skip the step")
        if target.dim() == 1 and not target.dtype.is_floating_point:
            if len(target) != batch:
                raise ValueError(f"target has {len(target)} labels but the exits' logits have batch size {batch}")
            if _compiling() or target.device.type == "meta":
                return target  # reading the check's answer would break the compiled graph (and wait for the device)
            outside = (target != self.ignore_index) & ((target < 0) | (target >= classes))
            if bool(outside.any()):  # on a GPU, torch's own check is a device-side assert
                raise ValueError(
                    f"target holds class {int(target[outside][0])}, outside [0, {classes}) for {classes}-class logits "
                    f"(unlabeled samples take ignore_index={self.ignore_index})"
                )
            return target
        if target.dim() == 2 and target.dtype.is_floating_point:
            if target.shape != (batch, classes):
                raise ValueError(f"soft target must have the logits' shape (B, C) = {(batch, classes)}, got {tuple(target.shape)}")
            if _compiling() or target.device.type == "meta":
                return target  # as for class indices: the check's answer is a host read
            rows = target.float().sum(1)
            if bool((target < 0).any() | ((rows - 1).abs() > 1e-3).any()):  # one read
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
            per_sample = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                         reduction="none")
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


def feature_adapters(feature_dims: Sequence[int] | None, always_linear: bool = False) -> nn.ModuleList | None:
    """Linear maps from each early exit's feature width to the final exit's (identity where equal,
    unless `always_linear`: BYOT's released code adapts every early exit with a Linear)."""
    if feature_dims is None:
        return None
    dims = [int(d) for d in feature_dims]
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"feature_dims must list each exit's feature width (>= 2 exits, positive), got {feature_dims!r}")
    return nn.ModuleList([nn.Identity() if d == dims[-1] and not always_linear else nn.Linear(d, dims[-1]) for d in dims[:-1]])
