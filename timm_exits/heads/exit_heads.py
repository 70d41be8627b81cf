"""The exit heads of a wrapped model, with the record of how they were built (checked when a checkpoint loads)."""
from __future__ import annotations

import json

import torch
from torch import nn

from .cascade import CascadedHead

__all__ = ["ExitHeads", "head_kind"]


def head_kind(head: nn.Module) -> str:
    """A head's class name, a cascaded head's with the head it wraps (``"CascadedHead(SDNHead)"``); a compiled head's as it was."""
    head = getattr(head, "compiled_from", head)  # compile_exits' CompiledPart
    return f"CascadedHead({type(head.head).__name__})" if isinstance(head, CascadedHead) else type(head).__name__


class ExitHeads(nn.ModuleList):
    """The exit heads, shallow to deep, and the wrap they were built for.

    A checkpoint records that wrap (the stages, each head's class) under ``exits._extra_state``,
    so that loading one from a model wrapped at other stages is refused by name even when the
    heads' shapes happen to agree.
    """

    def __init__(self, heads=None, stages=None):
        super().__init__(heads)
        self.stages = None if stages is None else list(stages)

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a slice keeps its heads' stages
            return type(self)(list(self._modules.values())[idx], None if self.stages is None else self.stages[idx])
        return super().__getitem__(idx)

    def _record(self) -> dict:
        return {"stages": list(self.stages), "heads": [head_kind(h) for h in self]}

    def get_extra_state(self) -> torch.Tensor:
        """JSON bytes in a uint8 tensor, so that torch.save, safetensors and distributed checkpoints all carry it."""
        return torch.tensor(list(json.dumps(self._record()).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Nothing to restore: the record is derived from the heads, and checked when a checkpoint loads."""

    def mismatch(self, saved) -> str | None:
        """How the wrap recorded in a checkpoint differs from this one, or None."""
        if not isinstance(saved, torch.Tensor):
            return None
        record, own = json.loads(bytes(saved.tolist()).decode()), self._record()
        if record == own:
            return None
        return (
            f"the checkpoint comes from a model wrapped at stages {record.get('stages')} with heads {record.get('heads')}; "
            f"this one is wrapped at stages {own['stages']} with heads {own['heads']}: wrap the backbone as it was when saved "
            "(or load with strict=False to take what fits)"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "_extra_state"
        mismatch = self.mismatch(state_dict.get(key))
        if mismatch:  # reported like an unexpected key, so that strict=False still takes what fits (also inside a parent module)
            unexpected_keys.append(f"{key} ({mismatch})")
        state_dict[key] = self.get_extra_state()  # a checkpoint saved before the wrap was recorded has none: it loads as before
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
