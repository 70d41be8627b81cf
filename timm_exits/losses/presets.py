"""Losses by name: with the library's defaults, or as the authors' released code configures them.

``create_loss(name, preset="authors", ...)`` builds a loss in the authors' configuration. Each
preset names the repository and file it was read from; where our defaults differ,
`docs/losses.md` says how. A method without released code has no preset.
"""
from __future__ import annotations

from collections.abc import Callable

from .base import MultiExitLoss
from .ce import MultiExitCELoss
from .distillation import DistillationBasedLoss, ExitEnsembleLoss
from .hints import MultiSelfDistillationLoss, SelfDistillationLoss
from .teachers import AppropriateTeachersLoss, EnsembleKnowledgeDistillationLoss

__all__ = ["create_loss", "loss_names", "PRESETS", "SOURCES", "authors_preset"]

#: name -> where its configuration was read
SOURCES = {
    "sdn": "yigitcankaya/Shallow-Deep-Networks, model_funcs.py (max_coeffs, the ramp) and network_architectures.py (100 epochs)",
    "distillation": "mary-phuong/multiexit-distillation, main.py (DistillationLoss) and train_cifar.py (C, maxprob, global_scale)",
    "eed": "hjdw2/Exit-Ensemble-Distillation, train.py (MSE to the detached mean of the logits; masked feature MSE, always on)",
    "byot": "ArchipLab-LinfengZhang/pytorch-self-distillation-final, train.py "
            "(a, T, the torch.dist feature term and its adaptation layers)",
}


def _needs(name: str, num_exits, at_least: int = 2) -> int:
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < at_least:
        raise ValueError(
            f"the authors' preset of {name!r} needs num_exits (model.num_exits, "
            f"at least {at_least}): its weights depend on it, got {num_exits!r}"
        )
    return num_exits


def _sdn(num_exits, epochs, given) -> dict:
    n = _needs("sdn", num_exits)
    if n - 1 > 6:
        raise ValueError(f"the SDN authors define C_i for at most 6 internal classifiers (0.15, 0.3, ..., 0.9); this model has {n - 1}")
    return {"depths": [round(0.15 * (k + 1), 2) for k in range(n - 1)]}  # by classifier index, not by depth


def _distillation(num_exits, epochs, given) -> dict:
    n = _needs("distillation", num_exits)
    return {"C": 0.5, "temperature": "adaptive", "t_mult": 1.05, "maxprob": 0.5, "t_squared": True, "scale": 2.0 * 5 / n}


def _eed(num_exits, epochs, given) -> dict:
    return {"distance": "mse", "feature_weight": 1.0}


def _byot(num_exits, epochs, given) -> dict:
    n = _needs("byot", num_exits, at_least=3)
    if "feature_dims" not in given:
        raise ValueError(
            "the authors' preset of 'byot' adapts each early exit's feature with a Linear: give feature_dims, each exit's feature width"
        )
    return {"alpha": 0.3, "temperature": 3.0, "t_squared": False, "feature_weight": 0.03, "feature_distance": "l2",
            "hint_exits": list(range(n - 2)), "linear_adapters": True}  # every early exit but the deepest


PRESETS: dict[str, Callable[..., dict]] = {"sdn": _sdn, "distillation": _distillation, "eed": _eed, "byot": _byot}


def authors_preset(name: str, preset: str, num_exits, epochs, given: dict) -> dict:
    """The keyword arguments of `name`'s loss in the authors' released code."""
    if preset != "authors":
        raise ValueError(f"preset must be 'authors' (or None for the library's defaults), got {preset!r}")
    if name not in PRESETS:
        raise ValueError(
            f"{name!r} has no authors' preset: no released code to match (presets exist for {sorted(PRESETS)}); "
            "its defaults follow the paper"
        )
    return PRESETS[name](num_exits, epochs, given)


_LOSSES: dict[str, Callable[..., MultiExitLoss]] = {
    "ce": MultiExitCELoss,
    "sdn": lambda **kw: MultiExitCELoss(schedule="sdn", **kw),
    "distillation": DistillationBasedLoss,
    "eed": ExitEnsembleLoss,
    "byot": SelfDistillationLoss,
    "msd": MultiSelfDistillationLoss,
    "mate": AppropriateTeachersLoss,
    "ekd": EnsembleKnowledgeDistillationLoss,
}
_NEEDS_EPOCHS = ("sdn", "msd")


def loss_names() -> list[str]:
    """The short names `create_loss` accepts."""
    return list(_LOSSES)


def create_loss(name: str, num_exits: int | None = None, epochs: int | None = None, *,
                preset: str | None = None, **kwargs) -> MultiExitLoss:
    """A loss by short name: ``ce``, ``sdn`` (SDN ramp), ``distillation`` (Phuong & Lampert), ``eed``,
    ``byot``, ``msd``, ``mate``, ``ekd``. `epochs` feeds the schedules of ``sdn`` and ``msd``.

    ``preset="authors"``: the configuration of the authors' released code, where there is one
    (``sdn``, ``distillation``, ``eed``, ``byot``; see `timm_exits.losses.presets`); keyword arguments
    given here override it.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {loss_names()}")
    if preset is not None:
        kwargs = {**authors_preset(name, preset, num_exits, epochs, kwargs), **kwargs}
    if name in _NEEDS_EPOCHS:
        kwargs["epochs"] = epochs
    return _LOSSES[name](num_exits=num_exits, **kwargs)
