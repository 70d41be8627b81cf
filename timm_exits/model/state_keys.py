"""Why a state_dict does not fit a wrapped model: the keys that differ and the likely cause, before anything loads."""
from __future__ import annotations

import re

from ..heads import ExitHeads

__all__ = ["check_state_keys"]



def _uncascaded(keys: set[str]) -> set[str]:
    """State keys as they would be without cascades: a CascadedHead's own map dropped, the head it wraps unwrapped."""
    return {re.sub(r"^exits\.(\d+)\.head\.", r"exits.\1.", k) for k in keys if not re.match(r"^exits\.\d+\.previous\.", k)}


def _listed(keys: set[str], limit: int = 8) -> str:
    names = sorted(keys)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_keys(model, state_dict) -> None:
    """Raise a RuntimeError naming the keys in which `state_dict` and `model` differ, and the likely cause."""
    record = "exits._extra_state"  # the wrap's record: compared below, and absent from checkpoints saved before it
    own = set(model.state_dict().keys()) - {record}
    given = set(state_dict.keys()) - {record}
    missing, unexpected = own - given, given - own
    if not missing and not unexpected:
        mismatch = model.exits.mismatch(state_dict.get(record)) if isinstance(model.exits, ExitHeads) else None
        if mismatch:  # before anything loads: the model stays as it was
            raise RuntimeError(mismatch)
        return
    backbone_keys = {k[len("backbone."):] for k in own if k.startswith("backbone.")}
    if not given & own and given & backbone_keys:
        raise RuntimeError(
            "this state_dict holds the backbone alone (its keys have no 'backbone.' prefix and no exit heads): "
            "load it with model.backbone.load_state_dict(state_dict), or load it into the backbone before wrap() "
            "(timm: create_model(name, checkpoint_path=...)); the exit heads keep their initialisation"
        )
    lines = [f"the state_dict does not match this {type(model).__name__} (stages={model.stages}, {model.num_exits} exits)"]
    if missing:
        lines.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        lines.append(f"unexpected keys: {_listed(unexpected)}")
    cascaded = lambda keys: any(".previous." in k for k in keys)  # noqa: E731 - a CascadedHead's map of the previous exit's logits
    if cascaded(missing) != cascaded(unexpected) and _uncascaded(own) == _uncascaded(given):  # the same heads, cascaded on one side only
        lines.append(
            f"the checkpoint comes from a model wrapped with cascade={cascaded(unexpected)}, "
            f"this one with cascade={cascaded(missing)}: wrap it as it was saved"
        )
    elif all(k.startswith("exits.") for k in missing | unexpected):
        lines.append(
            "only exit heads differ: the checkpoint comes from a model wrapped at other stages or with other heads; "
            "wrap the backbone the way it was wrapped when saved"
        )
    raise RuntimeError("; ".join(lines))
