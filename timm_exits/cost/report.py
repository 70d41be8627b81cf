"""What `flops_report` returns: per-exit FLOPs and parameters, as a table, dict, markdown or JSON."""
from __future__ import annotations

import dataclasses
import json

from tabulate import tabulate

__all__ = ["FlopsReport", "ExitCost", "CONVENTION"]


CONVENTION = "one fused multiply-add = 1 FLOP (fvcore); elementwise ops uncounted; per sample"


@dataclasses.dataclass(frozen=True)
class ExitCost:
    """What it costs one sample to reach one exit.

    ``flops = backbone_flops + head_flops``; ``share`` is ``flops`` over the whole backbone's
    FLOPs (the last exit, the backbone's own head, is 1). Parameters are counted the same way:
    every backbone parameter the segments up to this exit use, plus the head's. ``index`` counts
    from 0, like ``model(x)[index]`` (the printed table counts from 1).
    """

    index: int
    stage: str
    head: str
    backbone_flops: int
    head_flops: int
    flops: int
    share: float
    backbone_params: int
    head_params: int
    params: int


@dataclasses.dataclass
class FlopsReport:
    """Per-exit FLOPs and parameters; ``report.exits[k].flops`` is what exit k costs per sample.

    ``print(report)`` shows a table; `to_dict`, `to_markdown` and `to_json` give the same data.
    ``uncounted_ops`` counts the operators no handle counted (elementwise ones by convention);
    ``failed_ops`` names operators whose handle raised (they count 0 and the error is kept).
    """

    model: str
    input_size: tuple[int, ...]
    exits: list[ExitCost]
    backbone_flops: int
    all_exits_flops: int
    uncounted_ops: dict[str, int]
    failed_ops: dict[str, str]
    notes: list[str]
    convention: str = CONVENTION

    def to_dict(self) -> dict:
        """Plain Python data (the rows as dicts), ready for JSON; ``"exit"`` counts from 1, as the printed table does."""
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "convention": self.convention,
            "backbone_flops": self.backbone_flops,
            "all_exits_flops": self.all_exits_flops,
            "exits": [{"exit": e.index + 1, **{k: v for k, v in dataclasses.asdict(e).items() if k != "index"}} for e in self.exits],
            "uncounted_ops": dict(self.uncounted_ops),
            "failed_ops": dict(self.failed_ops),
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def _table(self) -> tuple[list[str], list[list[str]], str]:
        scale, unit = _unit(self.backbone_flops)
        header = ["exit", "attached after", "head", f"backbone {unit}", f"head {unit}", f"total {unit}", "share", "params (M)"]
        last = len(self.exits) - 1
        # the last exit is the backbone's own head, counted in the backbone: "-", not a 0 beside 0.0008284
        head_cell = lambda e: "-" if e.index == last else f"{e.head_flops / scale:.4g}"  # noqa: E731
        rows = [
            [str(e.index + 1), e.stage, e.head, f"{e.backbone_flops / scale:.4g}", head_cell(e), f"{e.flops / scale:.4g}",
             f"{e.share:.1%}", f"{e.params / 1e6:.3g}"]
            for e in self.exits
        ]
        title = f"{self.model}, input {'x'.join(map(str, self.input_size))}: {unit} per exit ({self.convention})"
        return header, rows, title

    def _footer(self) -> list[str]:
        scale, unit = _unit(self.backbone_flops)
        lines = [f"all exits computed (the wrapped model's forward): {self.all_exits_flops / scale:.4g} {unit}"]
        if self.uncounted_ops:
            ops = sorted(self.uncounted_ops.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("uncounted operators: " + ", ".join(f"{op} x{n}" for op, n in ops))
        for op, err in self.failed_ops.items():
            lines.append(f"counting {op} failed ({err}); it counts 0")
        return lines + list(self.notes)

    def to_markdown(self) -> str:
        header, rows, title = self._table()
        align = ["left" if i in (1, 2) else "right" for i in range(len(header))]
        table = tabulate(rows, header, tablefmt="github", disable_numparse=True, colalign=align)
        return "\n".join([f"**{title}**", "", table, ""] + [f"- {line}" for line in self._footer()]) + "\n"

    def __str__(self) -> str:
        header, rows, title = self._table()
        align = ["left" if i in (1, 2) else "right" for i in range(len(header))]
        return "\n".join([title, tabulate(rows, header, tablefmt="plain", disable_numparse=True, colalign=align), *self._footer()])


def _unit(flops: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "KFLOPs")):
        if flops >= scale:
            return scale, unit
    return 1.0, "FLOPs"
