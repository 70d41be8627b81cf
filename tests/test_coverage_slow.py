"""The wide sweep of docs/coverage.md: one model of every timm family, every torchvision classifier."""
import importlib.util
import sys
from pathlib import Path

import pytest

# tools/coverage.py: the sweep's list, its check and the recorded exceptions. It is loaded from its file under a
# name of its own: `import coverage` would give coverage.py, the package, wherever that was imported first.
_spec = importlib.util.spec_from_file_location("tools_coverage", Path(__file__).resolve().parents[1] / "tools" / "coverage.py")
coverage = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = coverage  # dataclasses look their module up there
_spec.loader.exec_module(coverage)

CASES = list(coverage.cases())


@pytest.mark.slow
@pytest.mark.parametrize("source,family,name,build,size", CASES, ids=[f"{c[0]}/{c[2]}" for c in CASES])
def test_model_wraps(source, family, name, build, size):
    result = coverage.check(build, source, family, name, size)
    problem = coverage.verdict(result)  # ok, or the status recorded for it in tools/coverage.py
    assert problem is None, problem


def test_recorded_exceptions_name_swept_models_once():
    names = [case[2] for case in CASES]
    listed = [name for _, known in coverage.KNOWN.values() for name in known]
    assert len(listed) == len(set(listed)), f"a model is in more than one of the KNOWN_ lists: {listed}"
    assert set(listed) <= set(names), f"not in the sweep: {sorted(set(listed) - set(names))}"
    assert all(reason for _, known in coverage.KNOWN.values() for reason in known.values()), "every recorded exception says why"


def _result(name, status, reason=""):
    return coverage.Result("timm", "family", name, status, reason=reason)


@pytest.mark.parametrize("status", ["ok", "fallback", "fails", "cannot build"])
def test_a_model_passes_only_with_its_recorded_status(monkeypatch, status):
    known = {"fails": ("KNOWN_FAILURES", {"broken": "why"}), "fallback": ("KNOWN_FALLBACKS", {"gemma": "why"}),
             "cannot build": ("KNOWN_UNBUILDABLE", {"needs_weights": "why"})}
    monkeypatch.setattr(coverage, "KNOWN", known)
    recorded = {"ok": "resnet", "fallback": "gemma", "fails": "broken", "cannot build": "needs_weights"}
    for expected, name in recorded.items():
        problem = coverage.verdict(_result(name, status, reason="TraceError: x"))
        if status == expected:
            assert problem is None
        else:
            assert problem and name in problem, (name, status, problem)


def test_what_a_changed_status_asks_for():
    assert coverage.expected_status("gemma4_vit_167m") == "fallback" and coverage.expected_status("resnet18") == "ok"
    asks = {  # (model, status the sweep found): what the failure message must say
        ("resnet18", "fallback"): ["newly falls back", "module 'layer1'", "KNOWN_FALLBACKS"],
        ("resnet18", "cannot build"): ["can no longer be built", "module 'layer1'", "KNOWN_UNBUILDABLE"],
        ("resnet18", "fails"): ["no longer wraps", "module 'layer1'", "KNOWN_FAILURES"],
        ("gemma4_vit_167m", "ok"): ["wraps through fx now", "remove it from KNOWN_FALLBACKS", "regenerate docs/coverage.md"],
        ("gemma4_vit_167m", "fails"): ["listed in KNOWN_FALLBACKS as 'fallback' but is now 'fails'"],
    }
    for (name, status), phrases in asks.items():
        problem = coverage.verdict(_result(name, status, reason="TraceError: module 'layer1'"))
        assert problem and name in problem and all(phrase in problem for phrase in phrases), problem
