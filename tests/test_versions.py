"""The declared versions: every lower bound in pyproject.toml is one CI installs (.ci/lowest.txt), and a
feature that needs a newer release names both releases at the call."""
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import timm

import timm_exits
from timm_exits._checks import needs_newer, release

ROOT = Path(__file__).resolve().parents[1]


def numbers(version: str) -> tuple[int, ...]:
    """A release's numbers with trailing zeros dropped: 2.5 and 2.5.0 are one release, 2.5.3 another."""
    parts = [int(p) for p in re.findall(r"\d+", version)]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def declared_floors() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for spec in project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]:
        name, _, bound = re.match(r"^([A-Za-z0-9_.-]+)\s*(>=\s*([^,;\s]+))?", spec).groups()
        assert bound, f"{spec!r} has no lower bound: every dependency declares the lowest release the suite passes on"
        earlier = floors.get(name.lower(), bound)
        assert numbers(earlier) == numbers(bound), f"{name} has two lower bounds: {earlier} and {bound}"
        floors[name.lower()] = bound
    return floors


def test_lowest_constraints_are_pyprojects_lower_bounds():
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    floors = declared_floors()
    assert pins.keys() == floors.keys()
    for name, floor in floors.items():
        assert numbers(pins[name]) == numbers(floor), f"{name}: pyproject's floor is {floor}, .ci/lowest.txt installs {pins[name]}"


def test_a_feature_needing_a_newer_release_names_both(tmp_path, monkeypatch):
    """save_pretrained of a hand-wrapped timm model, where timm lacks get_model_args (as every timm before 1.0.31 does)."""
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=5), stages=[1], input_size=(3, 32, 32))
    monkeypatch.setitem(sys.modules, "timm.models._input", None)  # importing it now fails, as on an older timm
    found = re.escape(importlib.metadata.version("timm"))
    needs = r"^save_pretrained of a timm model wrapped by hand needs timm >= 1.0.31 \(timm records a model's constructor arguments"
    with pytest.raises(RuntimeError, match=needs + rf" from then on\); this is timm {found}: pass model_args="):
        model.save_pretrained(tmp_path / "m")
    assert timm_exits.from_pretrained(model.save_pretrained(tmp_path / "m", model_args={})).stages == ["layer1"]
    missing = needs_newer("plotting", "no-such-package", "1.0", "figures")
    assert missing == "plotting needs no-such-package >= 1.0 (figures); this is no-such-package not installed"
    assert release("torch") >= (2, 5) and release("no-such-package") == ()
