"""Reading what a trainer wrote: timm's CheckpointSaver files, plain state dicts, safetensors and saved folders.

Loading is weights-only; the one class timm's saver pickles beside tensors (its ``args``) is
allowed, as timm's own task helpers allow it. `export_backbone` writes the plain backbone's
weights from a multi-exit checkpoint, for timm's ``validate.py`` and ``create_model``.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: The weights file of a folder `save_pretrained` wrote.
WEIGHTS = "model.safetensors"

__all__ = ["export_backbone", "load_training_checkpoint", "read_checkpoint"]


# What timm's CheckpointSaver pickles beside tensors: train.py's arguments (``args``). Loading with
# these allowed keeps weights_only's guarantee: no other class is built and no code runs.
_SAVER_GLOBALS = (argparse.Namespace,)


def load_training_checkpoint(path, mmap: bool = False):
    """``torch.load(weights_only=True)`` with what timm's CheckpointSaver writes allowed (``args``: an argparse.Namespace)."""
    with torch.serialization.safe_globals(list(_SAVER_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _unsafe_global(err: Exception) -> str | None:
    """The class a weights-only load refused to build, when that is why `err` was raised."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    return found.group(1) if found else None


def read_checkpoint(path, what: str, use_ema: bool) -> tuple[dict, str]:
    """The state dict in a file timm or torch wrote, and where in the file it was.

    A training checkpoint (a dict) gives its ``state_dict_ema`` when `use_ema` and it has one,
    else its ``state_dict`` (or ``model``); the wrappers' prefixes (``module.``, ``_orig_mod.``) go.
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS)):  # a folder save_pretrained wrote
        path = os.path.join(path, WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {str(path)!r} is not a file" + (f" (nor a folder with {WEIGHTS})" if os.path.isdir(path) else ""))
    try:
        if str(path).endswith(".safetensors"):
            state, where = load_file(str(path)), "the file"
        else:
            state, where = load_training_checkpoint(path), "the file"
            if isinstance(state, dict):
                for key in (("state_dict_ema", "model_ema") if use_ema else ()) + ("state_dict", "model"):
                    if isinstance(state.get(key), dict):
                        state, where = state[key], f"its {key!r}"
                        break
    except Exception as err:  # noqa: BLE001 - unpickling and safetensors raise many kinds; all mean an unreadable file
        refused = _unsafe_global(err)
        if refused is not None:
            allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in _SAVER_GLOBALS)
            raise ValueError(
                f"{what} {str(path)!r} holds a pickled {refused}, which loading with weights_only=True does not build (timm-exits "
                f"allows {allowed}, the args timm's CheckpointSaver writes). If you trust the file, save its weights alone: "
                f"torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'weights.pth'), and pass weights.pth") from None
        raise ValueError(f"{what} {str(path)!r} could not be read as a checkpoint: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {str(path)!r} holds no state dict of tensors (found {type(state).__name__} in {where})")
    if use_ema and "ema" not in where:
        where += " (it holds no EMA weights)"
    clean = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        clean[key] = value
    return clean, where


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike, use_ema: bool = False) -> tuple[Path, str]:
    """Write the plain backbone's weights from a multi-exit checkpoint, for timm's own tools; returns the file and
    where the weights came from.

    `checkpoint`: a file a trainer wrote (timm's ``train.py``: a dict whose ``state_dict`` has
    ``backbone.*`` and ``exits.*`` keys) or a folder `save_pretrained` wrote. `use_ema`: take the
    checkpoint's ``state_dict_ema`` instead (off by default, as in timm's ``validate.py``). `out`
    (``.safetensors``, or anything else for ``torch.save``) then loads with
    ``timm.create_model(name, checkpoint_path=out)`` and timm's ``validate.py``.
    """
    source = Path(checkpoint)
    state, where = read_checkpoint(source, "checkpoint", use_ema)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ValueError(
            f"{str(checkpoint)!r} has no 'backbone.*' keys: it is not a multi-exit checkpoint (a plain one loads into timm as it is)"
        )
    target = Path(out)
    if target.is_dir():
        raise ValueError(f"out {str(out)!r} is a folder: give the file to write, e.g. {str(target / 'backbone.safetensors')!r}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in backbone.items()}, str(target), metadata={"format": "pt"})
        else:
            torch.save(backbone, target)
    except OSError as err:
        raise ValueError(f"out {str(out)!r} could not be written: {err}") from None
    return target, where
