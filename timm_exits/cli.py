"""The ``timm-exits`` command."""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import timm
import torch
import torchvision
from tabulate import tabulate

from .cost.flops import flops_report
from .cost.placement import at_flops
from .demo.run import DATASETS, run_demo
from .deploy import create_model, export_backbone, export_onnx, from_pretrained
from .deploy.checkpoints import load_training_checkpoint
from .fx.stages import list_stages
from .heads import head_names
from .losses.presets import loss_names
from .model import wrap
from .runtime import Calibration
from .version import __version__

__all__ = ["main"]


class BadArgument(SystemExit):
    """A bad command-line argument: exit status 2, as argparse's own errors, and one line saying what is wrong."""

    def __init__(self, command: str, message: str):
        super().__init__(2)
        self.message = f"timm-exits {command}: error: {message}"

    def __str__(self) -> str:
        return self.message


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _stage_args(values: list[str]) -> list[int | str]:
    """Stages as the command line gives them: indices as ints, module names as they are."""
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def _demo(args: argparse.Namespace) -> int:
    _check_name(args.model)
    run_demo(model_name=args.model, stages=tuple(args.stages), head=args.head, loss=args.loss, epochs=args.epochs, seed=args.seed,
             plot=args.plot or None, baselines=not args.no_baselines, data=args.data, data_root=args.data_root, train_size=args.train_size)
    return 0


def _stages(args: argparse.Namespace) -> int:
    model = _build(args.model, args.num_classes)
    stages = list_stages(model, input_size=args.input_size)
    if args.json:
        rows = [{"index": s.index, "name": s.name, "channels": s.channels, "reduction": s.reduction, "layout": str(s.layout),
                 "final": s.final, "usable": s.usable, "reason": s.reason} for s in stages]
        print(json.dumps({"model": args.model, "stages": rows}, indent=2))
        return 0

    rows = [[s.index, s.name, "–" if s.channels is None else f"{s.channels} ch",
             "–" if not s.usable else f"1/{s.reduction}" if s.reduction else "tokens", s.layout or "–",
             "(final: feeds the head)" if s.final else "" if s.usable else f"(no exit here: {s.reason})"] for s in stages]
    print(tabulate(rows, ["index", "stage", "channels", "resolution", "layout", ""], tablefmt="plain", disable_numparse=True,
                   colalign=["right", "left", "right", "left", "left", "left"]))
    return 0


def _flops(args: argparse.Namespace) -> int:
    model = _build(args.model, args.num_classes)
    if args.at_flops:  # a size the model cannot run is named by the library (a ValueError: one line, exit 2)
        model = wrap(model, stages=at_flops(*args.at_flops), head=args.head, input_size=args.input_size)
    elif args.stages:
        model = wrap(model, stages=_stage_args(args.stages), head=args.head, input_size=args.input_size)
    report = flops_report(model, input_size=args.input_size)
    report.model = args.model
    print(report.to_json() if args.json else report.to_markdown() if args.markdown else report)
    return 0


def _export_backbone(args: argparse.Namespace) -> int:
    out, where = export_backbone(args.checkpoint, args.out, use_ema=args.use_ema)
    name = _saved_architecture(Path(args.checkpoint))
    print(
        f"wrote the plain backbone's weights (from {where} of {args.checkpoint}) to {out}: "
        f"timm.create_model({name!r}, checkpoint_path={str(out)!r}) and timm's validate.py load them"
    )
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if source.is_dir():
        if args.stages or args.checkpoint:
            raise ValueError(f"{source} is a saved model folder: it records its stages and weights; leave out --stages and --checkpoint")
        model = from_pretrained(source)
    else:
        if not args.stages:
            raise ValueError(f"{args.source!r} is not a save_pretrained folder: to build it as a timm model name, give --stages "
                             "(and --checkpoint with the weights your training wrote)")
        _check_name(args.source)
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_model(args.source, _stage_args(args.stages), checkpoint_path=args.checkpoint, input_size=args.input_size,
                             **kwargs).eval()
    if args.calibration:
        threshold = Calibration.load(args.calibration)
    else:
        threshold = args.threshold[0] if len(args.threshold) == 1 else args.threshold
    size = tuple(args.input_size or model.input_size)
    out = export_onnx(model, args.out, torch.zeros(1, *size), threshold=threshold, criterion=args.criterion,
                      dynamic_batch=not args.one_image)
    batch = "1" if args.one_image else "N"
    print(f"wrote {out}: ONNX Runtime runs it on 'input' ({batch}, {', '.join(map(str, size))}) and returns 'logits' and 'exit_index' "
          "(from 0), each sample leaving at the first exit it is confident at")
    return 0


def _saved_architecture(source: Path) -> str:
    """The timm name a checkpoint records: a save_pretrained folder's ``architecture``, a training checkpoint's ``arch``
    (timm's CheckpointSaver writes ``args.model`` there), or NAME (a torchvision backbone, no record, an unreadable file)."""
    try:
        if source.is_dir():
            name = json.loads((source / "config.json").read_text()).get("architecture")
        else:
            name = load_training_checkpoint(source, mmap=True).get("arch")  # mapped: the tensors are not read again
            name = name if isinstance(name, str) and timm.is_model(name) else None  # without args, the saver writes the class name
    except Exception:  # noqa: BLE001 - only the hint depends on it; the weights were already written
        return "NAME"
    return name if isinstance(name, str) and not name.startswith("torchvision:") else "NAME"


def _check_name(name: str) -> None:
    """A timm model name, or ``torchvision:NAME``, that exists; else the closest names (``hf-hub:`` names go to timm as they are)."""
    if name.startswith(("hf-hub:", "hf_hub:")):
        return

    if name.startswith("torchvision:"):
        tv_name, available, library = name.split(":", 1)[1], torchvision.models.list_models(module=torchvision.models), "torchvision"
    else:
        tv_name, available, library = name, timm.list_models(), "timm"
        if timm.is_model(name):
            return
    if tv_name not in available:
        close = difflib.get_close_matches(tv_name, available, n=5)
        raise ValueError(f"unknown {library} model {tv_name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _build(name: str, num_classes: int):
    """A timm model, or ``torchvision:NAME``, without pretrained weights (nothing is downloaded)."""
    _check_name(name)
    if name.startswith("torchvision:"):
        return torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timm-exits", description="Multi-exit networks from timm and torchvision classifiers.")
    parser.add_argument("--version", action="version", version=f"timm-exits {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a multi-exit resnet18 on the corrupted digits or Fashion-MNIST (CPU, minutes) against the plain backbone and a "
        "narrower one; print each exit's accuracy, FLOPs and early-exit speedup",
    )
    demo.add_argument("--data", default="digits", choices=sorted(DATASETS),
                      help="digits: the corrupted digits, built from scikit-learn's bundled scans (default); fashion-mnist: read "
                      "from --data-root or Debian's /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)")
    demo.add_argument("--data-root", default=None,
                      help="a folder with Fashion-MNIST's four IDX files (or torchvision's FashionMNIST/raw/ under it); never downloaded")
    demo.add_argument("--train-size", type=_positive_int, default=None,
                      help="Fashion-MNIST training images to train on (default: 6000 of the 55000 left after the validation split)")
    demo.add_argument("--model", default="resnet18", help="timm model name (default: resnet18)")
    demo.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="stage indices to attach exits to (default: 1 2 3)")
    demo.add_argument("--head", default="linear", choices=head_names(), help="exit head (default: linear)")
    demo.add_argument(
        "--loss",
        default="eed",
        choices=loss_names(),
        help="training objective: ce (per-exit CE), sdn (SDN-weighted CE), distillation (Phuong & Lampert), eed (exit-ensemble "
        "distillation, default), byot, msd, mate, ekd (distils from a plain backbone trained first)",
    )
    demo.add_argument("--epochs", type=_positive_int, default=8, help="training epochs (default: 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the weights and the batch order; the task is fixed (default: 0)")
    demo.add_argument("--no-baselines", action="store_true", help="skip training the plain backbone and the narrower model")
    demo.add_argument("--plot", default="demo_tradeoff.png",
                      help="where to write the accuracy-vs-FLOPs PNG (default: demo_tradeoff.png; '' for none)")
    demo.set_defaults(run=_demo)

    stages = sub.add_parser("stages", help="list the stages of a model that exits can attach to")
    stages.add_argument("model", help="timm model name, or torchvision:NAME")
    stages.add_argument("--num-classes", type=_positive_int, default=1000, help="classes of the backbone's head (default: 1000)")
    stages.add_argument("--input-size", type=_positive_int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="dummy input size (default: the model's own)")
    stages.add_argument("--json", action="store_true", help="print the stage table as JSON (index as wrap(stages=[index]) takes it)")
    stages.set_defaults(run=_stages)

    flops = sub.add_parser(
        "flops",
        help="print what each exit of a wrapped model costs: FLOPs (fvcore's convention) and parameters",
        description="Build MODEL without weights, attach exits, and print per-exit FLOPs and parameters for one sample "
        "(one fused multiply-add = 1 FLOP, as fvcore and the multi-exit papers count).",
    )
    flops.add_argument("model", help="timm model name, or torchvision:NAME")
    where = flops.add_mutually_exclusive_group()
    where.add_argument("--stages", nargs="+", metavar="STAGE",
                       help="stages to attach exits to: indices or module names, shallow to deep (see `timm-exits stages MODEL`)")
    where.add_argument("--at-flops", type=float, nargs="+", metavar="FRACTION",
                       help="instead of --stages: place exits where the backbone has spent these shares of its FLOPs, e.g. 0.25 0.5 0.75")
    flops.add_argument("--head", default="linear", choices=head_names(), help="exit head (default: linear)")
    flops.add_argument("--input-size", type=_positive_int, nargs=3, default=None, metavar=("C", "H", "W"),
                       help="size of one input sample (default: the model's own, e.g. 3 224 224)")
    flops.add_argument("--num-classes", type=_positive_int, default=1000,
                       help="classes of the backbone's head and of the exits (default: 1000)")
    output = flops.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--markdown", action="store_true", help="print the report as a markdown table")
    flops.epilog = "Without --stages or --at-flops the plain model is reported as a single exit."
    flops.set_defaults(run=_flops)

    export = sub.add_parser("export-backbone", help="write the plain backbone's checkpoint from a multi-exit one, for timm's own tools")
    export.add_argument("checkpoint", help="a checkpoint with backbone.* keys (timm's train.py writes one), or a save_pretrained folder")
    export.add_argument("out", help="where to write the backbone's weights (.safetensors, or a torch.save file)")
    export.add_argument("--use-ema", action="store_true",
                        help="take the checkpoint's EMA weights (state_dict_ema), as validate.py --use-ema does")
    export.set_defaults(run=_export_backbone)

    onnx = sub.add_parser(
        "export-onnx",
        help="write early exit as one ONNX file whose graph holds the exit decisions (run by ONNX Runtime, no PyTorch)",
        description="Write SOURCE, a save_pretrained folder or a timm model name with --stages, as one ONNX file: input 'input', "
        "outputs 'logits' and 'exit_index'. Needs torch >= 2.10 and pip install 'timm-exits[deploy]'.",
    )
    onnx.add_argument("source", help="a save_pretrained folder, or a timm model name (with --stages, and --checkpoint for its weights)")
    onnx.add_argument("out", help="the .onnx file to write")
    decide = onnx.add_mutually_exclusive_group(required=True)
    decide.add_argument("--threshold", type=float, nargs="+", metavar="T",
                        help="one confidence threshold for every early exit, or one per early exit (as early_exit takes them)")
    decide.add_argument("--calibration", metavar="FILE",
                        help="a calibration Calibration.save wrote: its thresholds, criterion and temperatures go into the graph")
    onnx.add_argument("--criterion", choices=["max_prob", "margin", "entropy", "patience"], default=None,
                      help="what a threshold is on (default: the calibration's, else max_prob)")
    onnx.add_argument("--stages", nargs="+", metavar="STAGE", help="with a model name: the stages to attach exits to")
    onnx.add_argument("--checkpoint", help="with a model name: the multi-exit weights to load (a timm train.py checkpoint, say)")
    onnx.add_argument("--num-classes", type=_positive_int, default=None, help="with a model name: classes of the head and the exits")
    onnx.add_argument("--input-size", type=_positive_int, nargs=3, default=None, metavar=("C", "H", "W"),
                      help="size of one input sample (default: the size the model was wrapped at)")
    onnx.add_argument("--one-image", action="store_true",
                      help="a file for one image at a time (its batch fixed at 1), without the row bookkeeping a batch needs")
    onnx.set_defaults(run=_export_onnx)

    args = parser.parse_args(argv)
    try:
        try:
            return args.run(args)
        except (ValueError, TypeError, FileNotFoundError) as err:  # the library's own errors name the argument and what is valid
            raise BadArgument(args.command, " ".join(line.strip() for line in str(err).splitlines())) from None
    except BadArgument as err:
        print(err, file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
