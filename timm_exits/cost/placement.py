"""Exits placed by rule: a placement picks the stages for a backbone, then `wrap()` builds as usual.

``wrap(model, stages=at_flops(0.25, 0.5, 0.75))`` puts the exits where the backbone has spent those
shares of its FLOPs, as Shallow-Deep Networks place theirs. A placement is any object with
``resolve(model, input_size, leaf_modules, autowrap_functions) -> stage names``.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from torch import nn

from ..fx.stages import candidate_stages
from ..fx.tracing import TraceOptions
from ..model import MultiExitModel, wrap
from .flops import flops_report

__all__ = ["at_flops", "FlopsPlacement"]


@dataclasses.dataclass(frozen=True)
class FlopsPlacement:
    """Stages chosen by cost: the candidates whose cumulative FLOPs are nearest to each fraction.

    Pass it as ``wrap(model, stages=timm_exits.at_flops(0.25, 0.5, 0.75))``; ``resolve(model)``
    shows which stage names it picks.
    """

    fractions: tuple[float, ...]
    candidates: str | tuple = "stages"

    def shares(self, model: nn.Module, input_size=None, leaf_modules=(), autowrap_functions=()) -> dict[str, float]:
        """Each candidate stage and the share of the backbone's FLOPs spent when its output is ready."""
        names = self._candidate_names(model, input_size, TraceOptions.of(leaf_modules, autowrap_functions))
        probe = wrap(model, stages=names, input_size=input_size, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
        report = flops_report(probe)
        return {e.stage: e.backbone_flops / report.backbone_flops for e in report.exits[:-1]}

    def resolve(self, model: nn.Module, input_size=None, leaf_modules=(), autowrap_functions=()) -> list[str]:
        """The stage names nearest to the fractions, shallow to deep."""
        shares = self.shares(model, input_size, leaf_modules, autowrap_functions)
        picked = [min(shares, key=lambda name: abs(shares[name] - f)) for f in self.fractions]
        if len(set(picked)) != len(picked):
            table = "\n".join(f"  {name}: {share:.1%}" for name, share in shares.items())
            hint = " or candidates='blocks' for a cut after every block" if self.candidates == "stages" else ""
            raise ValueError(
                f"at_flops{self.fractions}: several fractions land on the same stage ({picked}); give fractions further apart{hint}. "
                f"The candidate stages and their share of the backbone's FLOPs:\n{table}"
            )
        return picked

    def _candidate_names(self, model, input_size, options: TraceOptions) -> list:
        if isinstance(model, MultiExitModel):
            raise TypeError("at_flops places the exits of a model that is not wrapped yet; pass the backbone")
        if not isinstance(self.candidates, str):
            return list(self.candidates)
        return candidate_stages(model, self.candidates, input_size, options)


def at_flops(*fractions: float, candidates: str | Sequence = "stages") -> FlopsPlacement:
    """Place exits where the backbone has spent the given fractions of its FLOPs (Shallow-Deep Networks' rule).

    ``wrap(model, stages=at_flops(0.25, 0.5, 0.75))`` picks, for each fraction, the stage whose
    output is ready after the nearest share of the backbone's FLOPs (the backbone's own head
    counts in the total). Candidates are the model's stage table (``"stages"``, what
    `list_stages` shows), every clean cut between blocks (``"blocks"``: finer, for CNNs with few
    stages), or a list of stage names or indices.
    """
    if len(fractions) == 1 and isinstance(fractions[0], (list, tuple)):
        fractions = tuple(fractions[0])
    if not fractions:
        raise ValueError("at_flops needs at least one fraction, e.g. at_flops(0.25, 0.5, 0.75)")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
            raise ValueError(f"at_flops fractions must be numbers strictly between 0 and 1 (shares of the backbone's FLOPs), got {f!r}")
    if any(b <= a for a, b in itertools.pairwise(fractions)):
        raise ValueError(f"at_flops fractions must increase (shallow to deep), got {fractions}")
    if isinstance(candidates, str):
        if candidates not in ("stages", "blocks"):
            raise ValueError(f"candidates must be 'stages', 'blocks' or a list of stage names or indices, got {candidates!r}")
    else:
        candidates = tuple(candidates)
    return FlopsPlacement(tuple(float(f) for f in fractions), candidates)
