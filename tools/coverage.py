"""Which models wrap: one model of every timm family and every torchvision classifier.

For each model: build it without weights, pick two exits spread over its stage table, wrap it,
check that the last exit equals the plain model in eval (on its own input size), that the
per-exit FLOPs report sums to the plain model's FLOPs with no failing operator handle, and that
a training step reaches every head. Writes docs/coverage.md:

    python tools/coverage.py [--only timm|torchvision] [--out docs/coverage.md]

The slow test (tests/test_coverage_slow.py) runs the same check on the same list.
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import timm
import torch
import torchvision

import timm_exits
from timm_exits.fx.stages import candidate_stages

# The smallest model (by parameter count, counted on the meta device) of each timm module, as
# selected for timm 1.0.31. Families whose models all fail to build without weights are absent.
TIMM_FAMILIES: dict[str, str] = {
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet_h1",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_768_32",
    "convnext": "test_convnext",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "vit_tiny_patch16_dinov3_qkvb",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_b",
    "hgnet": "hgnetv2_b0",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "test_mambaout",
    "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_parfac_gap",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_ti_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "res2net": "res2next50",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_legacy_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "test_vit_relpos",
    "vision_transformer_sam": "samvit_base_patch16_224",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "xcit": "xcit_nano_12_p8_224",
}

# Today's exceptions to "wraps through fx", and why. The slow test fails when a model's status is
# not the one recorded here (a model not listed must be "ok"), also when a listed model now wraps:
# so a tracing regression cannot hide behind the fallback, and these lists stay true.
# Models that do not wrap.
KNOWN_FAILURES: dict[str, str] = {}
# Models that wrap only through timm's forward_intermediates: every exit is computed, early exit saves nothing.
KNOWN_FALLBACKS: dict[str, str] = {
    "gemma4_vit_167m": "torch.fx cannot trace its encoder (Gemma4VitEncoder): data-dependent control flow",
}
# Models that cannot be built without weights or arguments (a family whose models all need them is left out instead).
KNOWN_UNBUILDABLE: dict[str, str] = {}


@dataclass
class Result:
    source: str
    family: str
    model: str
    status: str  # ok | fallback | fails | cannot build
    stages: str = ""
    seconds: float = 0.0
    reason: str = ""


KNOWN = {"fails": ("KNOWN_FAILURES", KNOWN_FAILURES), "fallback": ("KNOWN_FALLBACKS", KNOWN_FALLBACKS),
         "cannot build": ("KNOWN_UNBUILDABLE", KNOWN_UNBUILDABLE)}


def expected_status(name: str) -> str:
    """The status recorded for `name`: the list it is in, or "ok"."""
    return next((status for status, (_, names) in KNOWN.items() if name in names), "ok")


def verdict(result: Result) -> str | None:
    """None when `result` has the status recorded for its model; otherwise what changed and what to do."""
    expected = expected_status(result.model)
    if result.status == expected:
        return None
    name, why = result.model, f" ({result.reason})" if result.reason else ""
    if expected != "ok":
        listed = KNOWN[expected][0]
        if result.status == "ok":
            return f"{name} wraps through fx now: remove it from {listed} in tools/coverage.py and regenerate docs/coverage.md"
        return f"{name} is listed in {listed} as {expected!r} but is now {result.status!r}{why}: fix it or move it to the right list"
    if result.status == "fallback":
        return (f"{name} newly falls back to forward_intermediates{why}, where early exit saves nothing: fix the trace (or register "
                "the module as a leaf), or, if it cannot be traced, add it to KNOWN_FALLBACKS in tools/coverage.py with the reason")
    if result.status == "cannot build":
        return (f"{name} can no longer be built{why}: pick another model for its family in tools/coverage.py, "
                "or add it to KNOWN_UNBUILDABLE with the reason")
    return f"{name} no longer wraps{why}: fix it, or add it to KNOWN_FAILURES in tools/coverage.py with the reason"


def _pick_stages(table, model=None, input_size=None) -> list:
    """Two stage indices a third and two thirds of the way through the stages that can take an exit
    (where no row of the table can, as in hrnet, two of the clean cuts between blocks, by name)."""
    indices = [s.index for s in table if s.usable and not s.final]  # the final stage is the head's
    if not indices and model is not None:
        indices = candidate_stages(model, "blocks", input_size)
    if len(indices) < 2:
        return indices[:1] or [0]
    return list(dict.fromkeys([indices[len(indices) // 3], indices[(2 * len(indices)) // 3]]))


def check(build, source: str, family: str, name: str, input_size=None) -> Result:
    """Wrap one model (at `input_size`, default: its own) and check the invariants a user relies on."""
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build().eval()
    except Exception as err:  # noqa: BLE001 - a model that needs weights or arguments to build is not ours to judge
        return Result(source, family, name, "cannot build", reason=f"{type(err).__name__}: {str(err)[:120]}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                stages = _pick_stages(timm_exits.list_stages(model, input_size=input_size), model, input_size)
            except timm_exits.TraceError:  # wrap() may still fall back to forward_intermediates
                stages = [1, 2]
            wrapped = timm_exits.wrap(model, stages=stages, input_size=input_size)
        fallback = next((str(w.message) for w in caught if "forward_intermediates" in str(w.message)), "")
        size = wrapped.input_size
        x = torch.randn(2, *size)
        with torch.no_grad():
            ours, ref = wrapped.eval()(x)[-1], model(x)
        if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"last exit differs from the plain model by {(ours - ref).abs().max().item():.2e}")
        report = timm_exits.flops_report(wrapped)  # one trace of every segment: it must lose and double nothing
        plain = timm_exits.flops_report(model, input_size=size).backbone_flops
        if report.failed_ops or abs(report.backbone_flops - plain) > 1e-3 * plain:
            raise AssertionError(f"FLOPs: the exits sum to {report.backbone_flops:,}, the plain model has {plain:,}; "
                                 f"failed handles: {report.failed_ops}")
        wrapped.train()
        sum(z.float().square().mean() for z in wrapped(x)).backward()
        if any(p.grad is None for p in wrapped.exits.parameters()):
            raise AssertionError("a head got no gradient")
        status = "fallback" if fallback else "ok"
        reason = fallback.split(": TraceError")[0] if fallback else ""
        return Result(source, family, name, status, stages=", ".join(wrapped.stages), seconds=time.perf_counter() - start, reason=reason)
    except Exception as err:  # noqa: BLE001 - whatever fails is this model's row; the sweep goes on
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        return Result(source, family, name, "fails", seconds=time.perf_counter() - start, reason=reason)


# Large encoders whose default input is 546-896 px; they take any size, and 224 keeps the sweep
# short (deepseek_vit_412m: 57 s instead of 349 s). They wrap at their native sizes too.
TIMM_SIZE = dict.fromkeys(("deepseek_vit_412m", "gemma4_vit_167m", "qwen3_vit_88m", "sam2_hiera_tiny"), (3, 224, 224))


def timm_cases():
    for family, name in sorted(TIMM_FAMILIES.items()):
        yield "timm", family, name, (lambda n=name: timm.create_model(n, pretrained=False, num_classes=10)), TIMM_SIZE.get(name)


# torchvision CNNs take any input size: 112x112 keeps the sweep short. These fix their size.
TORCHVISION_NATIVE_SIZE = ("vit_", "maxvit_", "swin_v2")
TORCHVISION_SIZE = {"inception_v3": (3, 299, 299)}  # its auxiliary head needs 299 in training


def torchvision_cases():
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        size = None if name.startswith(TORCHVISION_NATIVE_SIZE) else TORCHVISION_SIZE.get(name, (3, 112, 112))
        yield "torchvision", name, name, (lambda n=name: torchvision.models.get_model(n, weights=None, num_classes=10)), size


def cases(only: str | None = None):
    if only in (None, "timm"):
        yield from timm_cases()
    if only in (None, "torchvision"):
        yield from torchvision_cases()


def to_markdown(results: list[Result]) -> str:
    lines = [
        "# Coverage: which models wrap",
        "",
        "Generated by `python tools/coverage.py` (one model per timm family, the smallest by",
        f"parameter count; every torchvision classifier) with timm {timm.__version__}, torchvision",
        f"{torchvision.__version__}, torch {torch.__version__}. A model *wraps* when `wrap()` succeeds on two",
        "stages spread over its stage table, the last exit equals the plain model in eval (timm",
        "models at their own input size, but the four large encoders in TIMM_SIZE at 224x224;",
        "torchvision CNNs at 112x112, torchvision models with a fixed size at theirs), the per-exit",
        "FLOPs report sums to the plain model's FLOPs with no failing operator handle, and a training",
        "step reaches every head. *fallback* means fx could",
        "not trace it and timm's `forward_intermediates` was used (no early-exit savings).",
        "The models that fall back, fail or cannot be built are recorded, with the reason, in",
        "`KNOWN_FALLBACKS`, `KNOWN_FAILURES` and `KNOWN_UNBUILDABLE` in `tools/coverage.py`; the",
        "slow test fails when a model's status differs from the one recorded (any other model must be ok).",
        "",
    ]
    for source in ("timm", "torchvision"):
        rows = [r for r in results if r.source == source]
        if not rows:
            continue
        counts = {s: sum(r.status == s for r in rows) for s in ("ok", "fallback", "fails", "cannot build")}
        lines += [f"## {source}", "", ", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(rows)}.", ""]
        lines += ["| family | model | status | exits after | seconds | why not |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.family} | {r.model} | {r.status} | {r.stages} | {r.seconds:.1f} | {r.reason.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["timm", "torchvision"])
    parser.add_argument("--out", default="docs/coverage.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from tqdm.auto import tqdm

    results = []
    todo = list(cases(args.only))
    with tqdm(todo, desc="wrapping models", unit="model") as bar:  # a bar on stderr, one line per model on stdout
        for source, family, name, build, size in bar:
            bar.set_postfix_str(name)
            r = check(build, source, family, name, size)
            bar.write(f"{source:12s} {name:45s} {r.status:12s} {r.seconds:6.1f}s {r.reason[:150]}")
            results.append(r)
    with open(args.out, "w") as f:
        f.write(to_markdown(results))
    for problem in filter(None, map(verdict, results)):
        print(problem)


if __name__ == "__main__":
    main()
