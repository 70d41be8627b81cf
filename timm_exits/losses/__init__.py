"""Multi-exit training objectives: one loss class per published method, their shared base, and the factory.

Every loss is an ``nn.Module`` called as ``loss_fn(outputs, target)`` with the per-exit logits a
`MultiExitModel` returns (shallow to deep, the last is the backbone's head), or the `ExitOutputs`
of ``model(x, return_features=True)`` when a feature term is on. ``target`` is ``(B,)`` class
indices (``ignore_index`` marks unlabeled samples) or ``(B, C)`` soft targets (mixup / cutmix).
Each family has a file: `ce`, `distillation` (Phuong & Lampert, EED), `hints` (BYOT, MSD) and
`teachers` (MATE, EKD); `presets` holds `create_loss` and the authors' configurations.
"""
from .base import MultiExitLoss, kd_loss
from .ce import MultiExitCELoss
from .distillation import DistillationBasedLoss, ExitEnsembleLoss
from .hints import MultiSelfDistillationLoss, SelfDistillationLoss
from .presets import create_loss, loss_names
from .teachers import AppropriateTeachersLoss, EnsembleKnowledgeDistillationLoss
