"""The code blocks of the docs run, in order, each page in one namespace (as a reader would paste them)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/losses.md", "docs/heads.md", "docs/flops.md", "docs/early_exit.md", "docs/training.md"]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_run(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python code block"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{page}, code block {i} failed: {err!r}\n{block}") from err


def test_every_page_with_code_is_tested():
    pages = ["README.md"] + [f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))]
    with_code = [p for p in pages if python_blocks(p)]
    assert sorted(with_code) == sorted(PAGES)
