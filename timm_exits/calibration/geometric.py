"""Zero Time Waste's geometric ensembling: each exit decides on a learned, weighted product of the exits so far.

Wołczyk et al. (2021, "Zero Time Waste: Recycling Predictions in Early Exit Neural Networks")
combine, at exit k, the predictions of exits 0..k as a weighted geometric mean of their
probabilities. Their code (gmum/Zero-Time-Waste, ``ztw_cv_original/architectures/weighted_avg_model.py``)
computes ``mean_i(exp(w_ki) * log_softmax(z_i)) + b_k`` with one learned scalar ``w_ki`` per
member (initialised from N(0, 0.01)) and a learned per-class bias ``b_k`` (zeros), one small
model per exit, each fitted on cached logits with cross entropy (Adam, lr 5e-4, batch 512,
501 epochs; ``train_networks.py``). `fit_geometric_ensemble` does the same on a `CachedExits`;
the result goes where ``ensemble=`` is taken (`early_exit` with real skipping, and the calibration
functions). The authors fit on the training set's logits; a held-out split is the careful choice.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .._checks import real_number
from ..ensemble import GeometricEnsemble
from .cached import CachedExits

__all__ = ["fit_geometric_ensemble"]


def fit_geometric_ensemble(cached, epochs: int = 501, lr: float = 5e-4, batch_size: int = 512, seed: int = 0) -> GeometricEnsemble:
    """Fit a `GeometricEnsemble` on cached exits' labeled samples, as the ZTW code does (Adam, cross entropy, the defaults above)."""
    if not isinstance(cached, CachedExits):
        raise TypeError(f"cached must be a CachedExits (timm_exits.collect_exit_logits(...)), got {type(cached).__name__}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    lr = real_number(lr, "lr", "a learning rate > 0 (the ZTW code's is 5e-4)")
    if not lr > 0:
        raise ValueError(f"lr must be a learning rate > 0 (the ZTW code's is 5e-4), got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    seed = int(seed)  # a numpy integer too
    labeled = cached.labels >= 0
    if int(labeled.sum()) == 0:
        raise ValueError("fit_geometric_ensemble needs labeled samples: every label of the cached exits is negative (unlabeled)")
    logits, labels = cached.logits[:, labeled].float(), cached.labels[labeled]
    g = torch.Generator().manual_seed(seed)
    ensemble = GeometricEnsemble(cached.num_exits, logits.shape[-1], generator=g)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=lr)
    n = labels.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            for rows in torch.randperm(n, generator=g).split(batch_size):
                batch = list(logits[:, rows])
                # each exit's ensemble has parameters of its own: the sum trains each as alone (Adam is per parameter)
                loss = sum(F.cross_entropy(z, labels[rows]) for z in ensemble(batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return ensemble.eval().requires_grad_(False)
