"""What every dataset's splits and tasks share: indexing, subsets and the limited-label view."""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["UNLABELED", "SplitMethods", "TaskMethods"]

UNLABELED = -100  # the losses' default ignore_index


class SplitMethods:
    """For a frozen dataclass of per-image tensors whose first two fields are images ``x`` and labels ``y``."""

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):
        return self.x[index], self.y[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    def subset(self, mask: torch.Tensor):
        """The same split with only the rows `mask` selects (a bool mask or indices), every field alike."""
        return type(self)(*(t[mask] for t in dataclasses.astuple(self)))


class TaskMethods:
    """For a task with a ``train`` split and a ``labeled`` bool mask over its images."""

    def limited(self, unlabeled: bool = True):
        """The training split with only the labeled images' labels.

        With ``unlabeled=True`` the other images stay, labeled `UNLABELED` (-100, the losses'
        ``ignore_index``); with ``False`` they are dropped.
        """
        if not unlabeled:
            return self.train.subset(self.labeled)
        return dataclasses.replace(self.train, y=torch.where(self.labeled, self.train.y, torch.full_like(self.train.y, UNLABELED)))
