"""Multi-exit models by name, saved and rebuilt as timm models are: a folder with config.json and model.safetensors.

`create_model` builds a backbone by name (a timm name, ``hf-hub:...`` through timm, or
``torchvision:NAME``) and wraps it. `save_pretrained` writes the folder timm's hub files use: a
``config.json`` describing the backbone as timm does (``architecture``, ``num_classes``,
``model_args``, ``pretrained_cfg``), with the wrap under ``"timm_exits"`` (stages, heads and their
arguments, the input size, the library version), beside the weights in ``model.safetensors``.
`from_pretrained` rebuilds the model, its exits and weights from that folder alone.
`export_backbone` writes the plain backbone's checkpoint that timm's own tools load.
"""
from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from .._checks import is_real_number, needs_newer
from ..model import MultiExitModel, wrap
from ..version import __version__
from .checkpoints import WEIGHTS, read_checkpoint

__all__ = ["create_model", "save_pretrained", "from_pretrained"]

CONFIG = "config.json"


def _create_backbone(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    if not isinstance(name, str) or not name:
        raise TypeError(f"model_name must be a model name (a timm name, 'hf-hub:...' or 'torchvision:NAME'), got {name!r}")
    if name.startswith("torchvision:"):
        tv_name = name.split(":", 1)[1]
        if tv_name not in torchvision.models.list_models(module=torchvision.models):
            close = difflib.get_close_matches(tv_name, torchvision.models.list_models(module=torchvision.models), n=5)
            raise ValueError(f"unknown torchvision model {tv_name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        return torchvision.models.get_model(tv_name, weights="DEFAULT" if pretrained else None, **kwargs)

    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def create_model(
    model_name: str,
    stages: Sequence[int | str],
    head="linear",
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    *,
    use_ema: bool = True,
    head_kwargs: dict | None = None,
    eval_output: str | int = "all",
    input_size: Sequence[int] | None = None,
    leaf_modules: Sequence[type] = (),
    autowrap_functions: Sequence = (),
    cascade: bool | str = False,
    **kwargs,
) -> MultiExitModel:
    """Build `model_name` and wrap it with exits after `stages`: ``timm.create_model`` for multi-exit models.

    Args:
        model_name: a timm name (``"resnet50"``), ``"hf-hub:org/name"`` (through timm) or
            ``"torchvision:NAME"``.
        stages, head, head_kwargs, eval_output, input_size, leaf_modules, autowrap_functions, cascade:
            as `timm_exits.wrap` takes them.
        pretrained: the backbone's pretrained weights (downloaded by timm or torchvision).
        checkpoint_path: weights to load after wrapping: a multi-exit checkpoint (keys
            ``backbone.*`` and ``exits.*``, from the same wrap: another wrap is refused by name), or
            a plain backbone checkpoint (loaded into the backbone; the exits keep their initialisation).
        use_ema: take a training checkpoint's EMA weights when it has them, as
            ``timm.create_model(checkpoint_path=...)`` does.
        **kwargs: for the backbone's constructor (``num_classes``, ``in_chans``, ``img_size``, ...).

    Example::

        >>> model = timm_exits.create_model("resnet18", stages=[1, 2, 3], num_classes=10)
        >>> model.save_pretrained("my-model")   # config.json + model.safetensors
        >>> again = timm_exits.from_pretrained("my-model")
    """
    state = read_checkpoint(checkpoint_path, "checkpoint_path", use_ema)[0] if checkpoint_path is not None else None
    backbone = _create_backbone(model_name, pretrained, kwargs)
    if state is not None and not any(k.startswith(("backbone.", "exits.")) for k in state):
        backbone.load_state_dict(state)  # a plain checkpoint: the backbone's, before the wrap
        state = None
    model = wrap(backbone, stages, head, head_kwargs=head_kwargs, eval_output=eval_output, input_size=input_size,
                 leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, cascade=cascade)
    if state is not None:
        model.load_state_dict(state)
    model.backbone_spec = {"architecture": model_name, "model_args": dict(kwargs)}  # checked for JSON only when saved
    return model


def _json_ready(value: Any, what: str) -> Any:
    """`value` as JSON data (tuples become lists), or a ValueError naming `what`."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must be JSON data to be saved in config.json ({err}); pass plain numbers, strings, lists and dicts"
        ) from None


def _backbone_spec(model: MultiExitModel, model_name: str | None, model_args: dict | None) -> dict:
    """How to build the backbone again: its timm architecture and the arguments timm records, or what `create_model` was given.

    timm models are described as timm describes them (an ``hf-hub:`` name by the architecture it
    resolved to, so that the folder alone rebuilds it); the current ``num_classes`` always wins,
    so a model saved after ``reset_classifier`` rebuilds with its new heads.
    """
    spec = getattr(model, "backbone_spec", None) or {}
    cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    name = model_name or (cfg.get("architecture") if cfg else None) or spec.get("architecture")
    if not name:
        raise ValueError(
            f"save_pretrained cannot tell which model {type(model.backbone).__name__} is (it was not built by timm_exits.create_model "
            "and has no timm pretrained_cfg): pass model_name='torchvision:NAME' (or the timm name) and its model_args"
        )
    args = dict(spec.get("model_args", {})) if not cfg else {}
    if cfg:  # a timm model: the arguments its factory recorded, with what changed since (classes, pooling)
        try:
            from timm.models._input import get_model_args  # timm >= 1.0.31
        except ImportError:
            if model_args is None and not spec:
                raise RuntimeError(needs_newer("save_pretrained of a timm model wrapped by hand", "timm", "1.0.31",
                                               "timm records a model's constructor arguments from then on",
                                               instead="pass model_args= with those it was created with (beyond num_classes), "
                                                       "or build it with timm_exits.create_model")) from None
            args = dict(spec.get("model_args", {}))
        else:
            args = get_model_args(model.backbone)
    args = {k: v for k, v in {**args, **(model_args or {})}.items() if k not in ("device", "dtype")}  # where it runs is not what it is
    args["num_classes"] = model.num_classes
    return {"architecture": name, "model_args": _json_ready(args, "model_args")}


def _importable(reference: str, what: str) -> str:
    if (reference.startswith("<")
            or (":" in reference and ("<locals>" in reference or "<lambda>" in reference or reference.startswith("__main__:")))):
        raise ValueError(
            f"{what} {reference!r} cannot be imported when the model is rebuilt: define it at the top level of a module "
            "(or register the head with timm_exits.register_head and wrap by its name)"
        )
    return reference


def _resolve(reference: str) -> Any:
    """A head name as it is; ``module:qualname`` imported."""
    if ":" not in reference:
        return reference
    module, _, qualname = reference.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def save_pretrained(model: MultiExitModel, save_directory: str | os.PathLike, model_name: str | None = None, model_args: dict | None = None,
                    data_config: dict | None = None) -> Path:
    """Write `model` to `save_directory` as ``config.json`` and ``model.safetensors``; returns the folder.

    `model_name` and `model_args` name the backbone for a model not built by `create_model` and
    not a timm model (a torchvision one: ``model_name="torchvision:resnet18"``); for a timm model
    they are read from the model (timm >= 1.0.31 records its constructor arguments; with an older
    timm, pass `model_args` for a model wrapped by hand). Heads and leaf modules given as callables
    must be importable.

    The ``pretrained_cfg`` written describes the weights saved, for ``timm.data.resolve_data_config``:
    the current classes, the input size the model was wrapped at, no ``tag`` or source of the
    original release. `data_config` gives how the inputs were prepared when the model was trained
    (timm's keys: ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``); without it the
    backbone's ``mean`` and ``std`` stay, unless they are for another number of channels (then they go).
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"model must be a MultiExitModel (timm_exits.wrap or create_model), got {type(model).__name__}")
    wrap_args = model.wrap_args
    if wrap_args is None:
        raise ValueError(
            "this model was wrapped by a version of timm-exits that did not record its wrap: wrap its backbone again, then save"
        )
    config = _backbone_spec(model, model_name, model_args)
    config["num_classes"] = model.num_classes
    data = _check_data_config(data_config, model.input_size[0])
    cfg = getattr(model.backbone, "pretrained_cfg", None)
    if cfg or data:  # a backbone without one (torchvision's) gets one when the user says how its inputs were prepared
        config["pretrained_cfg"] = _current_cfg(cfg or {}, model.num_classes, list(model.input_size), data)
    exits = {**wrap_args, "eval_output": model.eval_output, "version": __version__}
    exits["head"] = [_importable(h, f"the head of exit {k + 1}") for k, h in enumerate(wrap_args["head"])]
    exits["leaf_modules"] = [_importable(m, "leaf module") for m in wrap_args["leaf_modules"]]
    exits["autowrap_functions"] = [_importable(f, "autowrap function") for f in wrap_args["autowrap_functions"]]
    exits["head_kwargs"] = _json_ready(exits["head_kwargs"], "head_kwargs")
    config["timm_exits"] = exits
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}  # clones: no shared storage
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    with open(folder / CONFIG, "w") as f:
        json.dump(config, f, indent=2)
    return folder


_SOURCE_KEYS = {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "tag"}
_DATA_KEYS = {"mean", "std", "interpolation", "crop_pct", "crop_mode"}


def _check_data_config(data_config: dict | None, channels: int) -> dict:
    """`data_config` checked before anything is written: timm's keys, a number per channel for mean and std, JSON values."""
    if data_config is None:
        return {}
    if not isinstance(data_config, dict) or not set(data_config) <= _DATA_KEYS:
        unknown = sorted(set(data_config) - _DATA_KEYS) if isinstance(data_config, dict) else data_config
        raise ValueError(f"data_config must be a dict of timm's data keys {sorted(_DATA_KEYS)}, got {unknown!r}")
    data = dict(data_config)
    for key in ("mean", "std"):
        value = data.get(key)
        if value is None:
            continue
        numbers_ = list(value) if isinstance(value, (tuple, list)) or getattr(value, "ndim", 0) == 1 else None
        if numbers_ is None or len(numbers_) != channels or not all(is_real_number(v) for v in numbers_):
            raise ValueError(f"data_config[{key!r}] must hold one number per input channel ({channels}), got {value!r}")
        data[key] = [float(v) for v in numbers_]
    if any(v <= 0 for v in data.get("std") or ()):
        raise ValueError(f"data_config['std'] must be positive, got {data_config['std']!r}")
    for key in ("interpolation", "crop_mode"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"data_config[{key!r}] must be a name as timm writes it (e.g. 'bicubic', 'center'), got {data[key]!r}")
    if "crop_pct" in data:
        if not is_real_number(data["crop_pct"]) or not 0 < float(data["crop_pct"]) <= 1:
            raise ValueError(f"data_config['crop_pct'] must be a number in (0, 1], got {data['crop_pct']!r}")
        data["crop_pct"] = float(data["crop_pct"])
    return data


def _current_cfg(cfg: dict, num_classes: int, input_size: list[int], data: dict) -> dict:
    """The backbone's pretrained_cfg as it describes the weights saved, as timm's ``save_config_for_hf`` writes it:
    without the release the original weights came from (source, tag), with the current classes (and no labels of
    another set), the input size the model was wrapped at, and how its inputs were prepared when `data` says so."""
    kept = {k: v for k, v in cfg.items()
            if k not in _SOURCE_KEYS and (v is not None or k in ("pool_size", "first_conv", "classifier")) and _serialisable(v)}
    if kept.get("num_classes") != num_classes:
        for key in ("label_names", "label_descriptions", "label_offset"):
            kept.pop(key, None)
    kept["num_classes"] = num_classes
    if list(kept.get("input_size") or ()) != input_size:  # the original release's test-time sizes describe other inputs
        for key in ("test_input_size", "test_crop_pct", "pool_size", "min_input_size"):
            kept.pop(key, None)
    kept["input_size"] = input_size
    for key in ("mean", "std"):  # ImageNet's three numbers cannot describe another number of channels
        if key in kept and len(kept[key]) != input_size[0]:
            del kept[key]
    kept.update(data)
    return kept


def _serialisable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def from_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MultiExitModel:
    """Rebuild a model `save_pretrained` wrote: the backbone from ``config.json``, wrapped as it was, with its weights.

    The model comes back in eval mode, as Hugging Face's ``from_pretrained`` gives it (``.train()``
    to fine-tune), on `map_location`. Heads, leaf modules and functions named in ``config.json`` are
    imported by name: load folders you trust, as with any pickle.
    """
    folder = Path(path)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder save_pretrained wrote: it needs {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CONFIG} could not be read as JSON ({err}): it is truncated or was edited; "
                         "save the model again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG} holds a {type(config).__name__}, not the object save_pretrained writes")
    exits = config.get("timm_exits")
    if exits is None:
        raise ValueError(
            f"{folder / CONFIG} describes a plain model (no 'timm_exits' section): build it with timm.create_model, then wrap it"
        )
    needed = {"stages", "head", "head_kwargs", "eval_output", "input_size", "leaf_modules", "autowrap_functions"}
    if "architecture" not in config or not needed <= set(exits):
        raise ValueError(
            f"{folder / CONFIG} lacks {sorted(needed - set(exits)) + ([] if 'architecture' in config else ['architecture'])}: "
            "it was not written by save_pretrained, or was edited"
        )
    model = create_model(
        config["architecture"],
        exits["stages"],
        head=[_resolve(h) for h in exits["head"]],
        head_kwargs=exits["head_kwargs"],
        eval_output=exits["eval_output"],
        input_size=exits["input_size"],
        leaf_modules=[_resolve(m) for m in exits["leaf_modules"]],
        autowrap_functions=[_resolve(f) for f in exits["autowrap_functions"]],
        cascade=exits.get("cascade", False),  # absent in folders saved before cascades existed
        **config.get("model_args", {}),
    )
    state, _ = read_checkpoint(folder / WEIGHTS, "weights file", use_ema=False)  # a truncated file is named, not a bare SafetensorError
    model.load_state_dict(state)
    saved_cfg = config.get("pretrained_cfg")
    if isinstance(saved_cfg, dict) and hasattr(model.backbone, "pretrained_cfg"):  # set after building: it describes, never constructs
        model.backbone.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in saved_cfg.items()}
        if hasattr(model.backbone, "default_cfg"):  # timm's older name for the same dict
            model.backbone.default_cfg = model.backbone.pretrained_cfg
    return model.to(map_location).eval()


