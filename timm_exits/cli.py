"""The ``timm-exits`` command."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_name=args.model, stages=tuple(args.stages), head=args.head, loss=args.loss, epochs=args.epochs, seed=args.seed, plot=args.plot or None)
    return 0


def _stages(args: argparse.Namespace) -> int:
    from .stages import list_stages

    model = _build(args.model, args.num_classes)
    for s in list_stages(model, input_size=args.input_size):
        where = f"1/{s.reduction}" if s.reduction else "tokens"
        print(f"{s.index:>3}  {s.name:<40} {s.channels:>6} ch  {where:<7} {s.layout}" + ("  (final: feeds the head)" if s.final else ""))
    return 0


def _flops(args: argparse.Namespace) -> int:
    from .flops import flops_report
    from .model import wrap
    from .placement import at_flops

    model = _build(args.model, args.num_classes)
    try:
        if args.at_flops:
            model = wrap(model, stages=at_flops(*args.at_flops), head=args.head, input_size=args.input_size)
        elif args.stages:
            model = wrap(model, stages=[int(s) if s.lstrip("-").isdigit() else s for s in args.stages], head=args.head, input_size=args.input_size)
        report = flops_report(model, input_size=args.input_size)
        report.model = args.model
    except (ValueError, TypeError) as err:
        raise SystemExit(f"timm-exits flops: {err}") from None
    print(report.to_json() if args.json else report.to_markdown() if args.markdown else report)
    return 0


def _build(name: str, num_classes: int):
    """A timm model, or ``torchvision:NAME``, without pretrained weights (nothing is downloaded)."""
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        available = torchvision.models.list_models(module=torchvision.models)
        if tv_name not in available:
            import difflib

            close = difflib.get_close_matches(tv_name, available, n=5)
            raise SystemExit(f"unknown torchvision model {tv_name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise SystemExit(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def main(argv: list[str] | None = None) -> int:
    from .losses import loss_names

    parser = argparse.ArgumentParser(prog="timm-exits", description="Multi-exit networks from timm and torchvision classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a multi-exit resnet10t on scikit-learn's digits (CPU, ~1 minute) and print each exit's accuracy")
    demo.add_argument("--model", default="resnet10t", help="timm model name (default: resnet10t)")
    demo.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="stage indices to attach exits to (default: 1 2 3)")
    demo.add_argument("--head", default="linear", help="exit head: linear, sdn, conv, bottleneck, replica (default: linear)")
    demo.add_argument(
        "--loss",
        default="eed",
        choices=loss_names(),
        help="training objective: ce (per-exit CE), sdn (SDN-weighted CE), distillation (Phuong & Lampert), eed (exit-ensemble "
        "distillation, default), byot, msd, mate, ekd (distils from a plain backbone trained first)",
    )
    demo.add_argument("--epochs", type=int, default=6, help="training epochs (default: 6)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the split and the weights (default: 0)")
    demo.add_argument("--plot", default="demo_tradeoff.png", help="where to write the accuracy-vs-FLOPs PNG (default: demo_tradeoff.png; '' for none)")
    demo.set_defaults(run=_demo)

    stages = sub.add_parser("stages", help="list the stages of a model that exits can attach to")
    stages.add_argument("model", help="timm model name, or torchvision:NAME")
    stages.add_argument("--num-classes", type=int, default=1000, help="classes of the backbone's head (default: 1000)")
    stages.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="dummy input size (default: the model's own)")
    stages.set_defaults(run=_stages)

    flops = sub.add_parser(
        "flops",
        help="print what each exit of a wrapped model costs: FLOPs (fvcore's convention) and parameters",
        description="Build MODEL without weights, attach exits, and print per-exit FLOPs and parameters for one sample "
        "(one fused multiply-add = 1 FLOP, as fvcore and the multi-exit papers count).",
    )
    flops.add_argument("model", help="timm model name, or torchvision:NAME")
    where = flops.add_mutually_exclusive_group()
    where.add_argument("--stages", nargs="+", metavar="STAGE", help="stages to attach exits to: indices or module names, shallow to deep (see `timm-exits stages MODEL`)")
    where.add_argument("--at-flops", type=float, nargs="+", metavar="FRACTION", help="instead of --stages: place exits where the backbone has spent these shares of its FLOPs, e.g. 0.25 0.5 0.75")
    flops.add_argument("--head", default="linear", help="exit head: linear, sdn, conv, bottleneck, replica (default: linear)")
    flops.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"), help="size of one input sample (default: the model's own, e.g. 3 224 224)")
    flops.add_argument("--num-classes", type=int, default=1000, help="classes of the backbone's head and of the exits (default: 1000)")
    output = flops.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--markdown", action="store_true", help="print the report as a markdown table")
    flops.epilog = "Without --stages or --at-flops the plain model is reported as a single exit."
    flops.set_defaults(run=_flops)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
