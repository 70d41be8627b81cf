"""Losses with teachers beyond the exits themselves: learned ensemble teachers (MATE) and external teachers (EKD).

Notation as in `timm_exits.losses.distillation`: z_i the logits of exit i = 1..N, sg the
stop-gradient, KD_T(p, z) = T^2 KL(p || softmax(z / T)).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import MultiExitLoss, check_fraction, check_positive, kd_loss, kd_matrix, soft

__all__ = ["AppropriateTeachersLoss", "EnsembleKnowledgeDistillationLoss"]


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

    def __init__(self, num_exits: int, lam: float = 0.5, temperature: float = 3.0, primary_init: float = 1.0,
                 t_squared: bool = True, **kwargs):
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

    def __init__(self, alpha: float = 0.5, temperature: float = 3.0, assignment: Sequence[int] | None = None,
                 ensemble_weight: float = 1.0, t_squared: bool = True, **kwargs):
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
        if isinstance(teacher_logits, nn.Module) or (
            isinstance(teacher_logits, (list, tuple)) and any(isinstance(t, nn.Module) for t in teacher_logits)
        ):
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
        return self._repr(alpha=self.alpha, temperature=self.temperature, assignment=self.assignment, ensemble_weight=self.ensemble_weight,
                          t_squared=self.t_squared)
