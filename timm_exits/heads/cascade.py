"""Zero Time Waste's cascade: an exit head that also reads the previous exit's logits."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CascadedHead"]


class CascadedHead(nn.Module):
    """Zero Time Waste's cascade (Wołczyk et al. 2021): a head that also reads the previous exit's logits.

    ``forward(x, previous)`` is ``head(x) + W norm(previous)``, `previous` detached, ``W`` a
    ``(num_classes, num_classes)`` linear map without bias. For a head that ends in a linear
    layer on its pooled feature (every built-in head), that is the authors' layer: a linear
    classifier on the pooled feature concatenated with the previous logits
    (gmum/Zero-Time-Waste, ``ztw_cv_original/aux_funcs.py``, ``InternalClassifier`` with
    ``--stacking --detach_prev``); the classifier and ``W`` then start as that one layer of
    ``feature + num_classes`` inputs would (PyTorch's default uniform bound ``1/sqrt(fan_in)``).
    ``norm=True`` puts a LayerNorm on the detached logits first (their ``--detach_norm
    layernorm``). Any head kind can be cascaded; ``wrap(..., cascade=True)`` cascades every exit
    head after the first, and the wrapped model passes each exit's logits on, also when early
    exit drops samples and in exported steps.
    """

    cascaded = True

    def __init__(self, head: nn.Module, num_classes: int, norm: bool = False, detach: bool = True):
        super().__init__()
        ref = next(head.parameters(), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None and ref.is_floating_point() else {}
        self.head = head
        self.norm = nn.LayerNorm(num_classes, **factory) if norm else nn.Identity()
        self.previous = nn.Linear(num_classes, num_classes, bias=False, **factory)
        self.detach = detach
        self._init_as_one_layer()

    def _init_as_one_layer(self) -> None:
        fc = getattr(self.head, "fc", None)
        if isinstance(fc, nn.Linear):
            bound = 1.0 / math.sqrt(fc.in_features + self.previous.in_features)
            with torch.no_grad():
                for p in (fc.weight, fc.bias, self.previous.weight):
                    if p is not None:
                        p.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, previous: torch.Tensor, return_features: bool = False):
        previous = self.norm(previous.detach() if self.detach else previous)
        out = self.head(x, return_features=True) if return_features else self.head(x)
        if return_features:
            logits, feature = out
            return logits + self.previous(previous.to(logits.dtype)), feature
        return out + self.previous(previous.to(out.dtype))

    def reset_classifier(self, num_classes: int) -> None:
        """Reset the inner head's classifier and the map from the previous logits, for `num_classes` classes."""
        self.head.reset_classifier(num_classes)
        ref = self.previous.weight
        self.norm = nn.LayerNorm(num_classes, device=ref.device, dtype=ref.dtype) if isinstance(self.norm, nn.LayerNorm) else nn.Identity()
        self.previous = nn.Linear(num_classes, num_classes, bias=False, device=ref.device, dtype=ref.dtype)
        self._init_as_one_layer()

    def extra_repr(self) -> str:
        return f"detach={self.detach}"
