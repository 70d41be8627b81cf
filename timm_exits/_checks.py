"""Argument checks shared by the public calls: each returns the value in the form the caller uses, or raises naming it."""
from __future__ import annotations

import importlib.metadata
import numbers
import os
import re
from pathlib import Path

__all__ = ["figure_path", "is_int", "is_real_number", "needs_newer", "positive_int", "real_number", "release", "require"]


def release(package: str) -> tuple[int, ...]:
    """The installed release of `package` as numbers (``"2.5.0+cu124"`` -> ``(2, 5, 0)``); ``()`` when it is not installed."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def needs_newer(feature: str, package: str, minimum: str, why: str, instead: str = "") -> str:
    """What a call that needs a newer release of `package` says when it finds the feature missing.

    ``needs_newer("save_pretrained ...", "timm", "1.0.31", "get_model_args")`` gives
    ``save_pretrained ... needs timm >= 1.0.31 (get_model_args); this is timm 1.0.12``; `instead`,
    when given, follows as what the caller can do on the older release. Detect the feature (an
    import, an attribute) rather than compare versions: a source build may have it early.
    """
    installed = importlib.metadata.version(package) if release(package) else "not installed"
    message = f"{feature} needs {package} >= {minimum} ({why}); this is {package} {installed}"
    return message + (f": {instead}" if instead else "")


def _scalar(value):
    """A 0-d tensor or numpy array as its Python number (a bool or complex one is then refused by the caller); else `value`."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def is_real_number(value) -> bool:
    """Whether `value` is one real number: a Python, numpy or 0-d tensor scalar, not a bool."""
    value = _scalar(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def real_number(value, name: str, valid: str) -> float:
    """`value` as a float when it is one real number (`is_real_number`).

    Anything else raises a ValueError naming `name`, the value and what is `valid`.
    """
    if not is_real_number(value):
        raise ValueError(f"{name} must be {valid}, got {_scalar(value)!r}")
    return float(_scalar(value))


def positive_int(value, name: str, what: str = "") -> int:
    """`value` when it is an int >= 1 (not a bool; a numpy integer is taken as its int), else a ValueError naming `name`
    (and `what` it is, when given)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{name} must be an int >= 1{f' ({what})' if what else ''}, got {value!r}")


def is_int(value) -> bool:
    """Whether `value` is a Python int and not a bool (a bool is an int to Python, never a count or a seed to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(name: str, value, valid: str, ok: bool) -> None:
    """Raise a ValueError naming `name`, the `value` and what is `valid` unless `ok`."""
    if not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def figure_path(path, example: str):
    """`path` to save a figure to (a file name, or a binary file object, as matplotlib takes).

    A folder is refused, since matplotlib would write ``FOLDER.png`` beside it, and so is a name
    ending in a separator. Checked before anything is drawn.
    """
    if isinstance(path, (str, os.PathLike)) and (Path(path).is_dir() or str(path).endswith(("/", os.sep))):
        raise ValueError(f"path {str(path)!r} is a folder: give the file to write, e.g. {str(Path(path) / example)!r}")
    return path
