"""The wide sweep of docs/coverage.md: one model of every timm family, every torchvision classifier."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import coverage  # noqa: E402  (benchmarks/coverage.py: the sweep's list and its check)

CASES = list(coverage.cases())


@pytest.mark.slow
@pytest.mark.parametrize("source,family,name,build,size", CASES, ids=[f"{c[0]}/{c[2]}" for c in CASES])
def test_model_wraps(source, family, name, build, size):
    result = coverage.check(build, source, family, name, size)
    if result.status == "cannot build":
        pytest.skip(result.reason)
    if name in coverage.KNOWN_FAILURES:
        assert result.status == "fails", f"{name} wraps now: remove it from KNOWN_FAILURES and regenerate docs/coverage.md"
    else:
        assert result.status in ("ok", "fallback"), result.reason
