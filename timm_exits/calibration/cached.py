"""Every exit's logits on a held-out set, cached once: what thresholds, temperatures and ensembles are fitted on."""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from .._progress import Progress
from ..ensemble import GeometricEnsemble, anytime_ensemble
from ..fx.modes import evaluating
from ..model import MultiExitModel
from ..runtime.criteria import check_ensemble, check_temperatures, exit_confidence, patience_streaks
from ..runtime.rows import exit_costs

__all__ = ["CachedExits", "collect_exit_logits"]


@dataclasses.dataclass
class CachedExits:
    """Every exit's logits on a dataset, its labels, and what leaving at each exit costs.

    ``logits (E, N, C)``, ``labels (N,)``, ``flops`` (E values: backbone up to exit k plus heads
    0..k, per sample, as `early_exit` spends them) and the exits' ``stages``. A negative label
    (the losses' ``ignore_index``, -100) marks an unlabeled sample: it counts in the FLOPs
    averages and the exit shares, not in the accuracies.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    flops: list[float]
    stages: list[str]

    def __post_init__(self):
        if self.logits.dim() == 3 and self.logits.shape[1] == 0:
            raise ValueError("logits hold no samples (shape (num_exits, 0, C)): thresholds need cached exits of at least one sample")
        if self.logits.dim() != 3:
            raise ValueError(f"logits must be (num_exits, N, C), got shape {tuple(self.logits.shape)}")
        if self.labels.shape != self.logits.shape[1:2]:
            raise ValueError(f"labels must be (N,) = ({self.logits.shape[1]},), got shape {tuple(self.labels.shape)}")
        if len(self.flops) != self.logits.shape[0]:
            raise ValueError(f"flops has {len(self.flops)} values for {self.logits.shape[0]} exits")
        classes = self.logits.shape[2]
        if classes == 1:
            raise ValueError(
                "logits hold one logit per sample (C = 1): thresholds read a prediction as the argmax over classes and a confidence from "
                "a softmax, both constant over one logit; cache two-class logits instead, torch.cat([torch.zeros_like(z), z], -1) "
                "(their softmax is sigmoid(z))"
            )
        if self.labels.numel() and int(self.labels.max()) >= classes:
            raise ValueError(
                f"labels hold class {int(self.labels.max())}, outside [0, {classes}) for {classes}-class logits "
                "(unlabeled samples take a negative label)"
            )

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    def confidences(self, criterion="max_prob", ensemble: bool = False) -> torch.Tensor:
        """``(E, N)`` confidence of every exit (or of the anytime ensemble) on every sample (for ``"patience"``: the streaks)."""
        if criterion == "patience":
            return patience_streaks(self.predictions(ensemble)).double()
        return torch.stack([exit_confidence(z, criterion) for z in self._outputs(ensemble)])

    def predictions(self, ensemble: bool = False) -> torch.Tensor:
        """``(E, N)`` predicted class of every exit (or anytime ensemble)."""
        return torch.stack([z.argmax(-1) for z in self._outputs(ensemble)])

    def scaled(self, temperature) -> CachedExits:
        """The same cache with exit k's logits divided by temperature k (`calibrate_temperature`'s, or one number per exit)."""
        values = check_temperatures(temperature, self.num_exits)
        if values is None:
            return self
        t = torch.tensor(values, dtype=self.logits.dtype).view(-1, 1, 1)
        return CachedExits(self.logits / t, self.labels, self.flops, self.stages)

    def _outputs(self, ensemble) -> list[torch.Tensor]:
        if isinstance(ensemble, GeometricEnsemble):
            check_ensemble(ensemble, self.num_exits)
            with torch.no_grad():
                return ensemble(list(self.logits))
        if not ensemble:
            return list(self.logits)
        return anytime_ensemble(list(self.logits))


@torch.no_grad()
def collect_exit_logits(model: MultiExitModel, loader, device=None, progress: bool | None = None) -> CachedExits:
    """One pass over `loader` (batches of ``(inputs, labels, ...)``) caching every exit's logits, on the CPU.

    `progress`: True: a tqdm bar over the batches where standard error is a terminal, else a line
    on standard error at the start, at most every 10 seconds and at the end (``collecting exit
    logits, batch 40/84 (47%), 12s``); False: nothing. None (the default): the bar on a terminal,
    else the same lines through the ``timm_exits`` logger at INFO, as timm's train.py logs its
    progress: they appear where the application logs at INFO (timm's ``setup_default_logging``,
    ``logging.basicConfig(level=logging.INFO)``) and a script that never configured logging stays quiet.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"collect_exit_logits needs a MultiExitModel, got {type(model).__name__}")
    if model.num_classes == 1:  # named before the pass over the data, not after it
        raise ValueError(
            "the model outputs one logit per sample: thresholds need class logits (CachedExits says why); "
            "early_exit takes a callable criterion instead"
        )
    logits, labels, sizes = [], [], Counter()
    with evaluating(model):
        for batch in Progress(progress)(loader, "collecting exit logits"):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("each batch of the loader must be (inputs, labels, ...)")
            x, y = batch[0], batch[1]
            if device is not None:
                x = x.to(device)
            sizes[tuple(x.shape[1:])] += x.shape[0]
            logits.append(torch.stack([z.float().cpu() for z in model.forward_exits(x)]))
            labels.append(torch.as_tensor(y).cpu())
    if not logits:
        raise ValueError("the loader gave no batches")
    # inputs of several sizes cost what they cost: each exit's cost is the average over the samples
    costs = torch.tensor([exit_costs(model, size) for size in sizes], dtype=torch.float64)
    counts = torch.tensor(list(sizes.values()), dtype=torch.float64).unsqueeze(1)
    flops = ((costs * counts).sum(0) / counts.sum()).tolist()
    return CachedExits(torch.cat(logits, 1), torch.cat(labels), flops, list(model.stages) + ["final"])
