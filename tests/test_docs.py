"""The code blocks of the docs run, in order, each page in one namespace (as a reader would paste them)."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/losses.md", "docs/heads.md", "docs/flops.md", "docs/early_exit.md", "docs/training.md",
         "docs/surgery.md"]


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


CHECKS = {"allclose", "isclose", "equal", "all", "any"}  # calls whose printed result would be a claim nobody checks


def unchecked_claims(block: str) -> list[str]:
    """The lines of `block` that pass when their claim is false: a printed comparison, an expected error without `else`."""
    found = []
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Try) and node.handlers and not node.orelse:
            found.append(f"line {node.lineno}: an expected error needs `else: raise AssertionError(...)` for when nothing is raised")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            for arg in node.args:
                called = getattr(arg.func, "attr", getattr(arg.func, "id", None)) if isinstance(arg, ast.Call) else None
                if isinstance(arg, (ast.Compare, ast.BoolOp)) or called in CHECKS:
                    found.append(f"line {node.lineno}: print({ast.unparse(arg)}) shows a check: assert it")
    return found


@pytest.mark.parametrize("page", PAGES)
def test_claims_in_the_docs_are_asserted(page):
    found = [f"block {i}, {claim}" for i, block in enumerate(python_blocks(page)) for claim in unchecked_claims(block)]
    assert not found, f"{page}: " + "; ".join(found)


def test_unchecked_claims_are_found():
    printed = "import torch\nprint(torch.allclose(torch.ones(1), torch.ones(1)), 1 == 2)\n"
    silent = "try:\n    int('1')\nexcept ValueError as err:\n    print(err)\n"
    assert len(unchecked_claims(printed)) == 2 and len(unchecked_claims(silent)) == 1
    assert unchecked_claims(silent + "else:\n    raise AssertionError('no error')\n") == []


ORDER_NOTE = "The code blocks on this page run in order, in one session"


def names_from_earlier_blocks(blocks: list[str]) -> dict[int, set[str]]:
    """For each block, the names it reads that only an earlier block defines (what fails with NameError when copied alone)."""
    import builtins

    def bound(tree) -> set[str]:
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.id)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
                names.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                names.add(node.name)
            elif isinstance(node, ast.Lambda):
                names.update(a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg))
        return names

    defined, needs = set(), {}
    for i, block in enumerate(blocks):
        tree = ast.parse(block)
        read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        missing = (read - bound(tree) - set(dir(builtins))) & defined
        if missing:
            needs[i] = missing
        defined |= bound(tree)
    return needs


@pytest.mark.parametrize("page", PAGES)
def test_a_page_whose_blocks_build_on_each_other_says_so_before_its_first(page):
    """A reader who copies one block alone meets a NameError unless the page says the blocks run as one session."""
    needs = names_from_earlier_blocks(python_blocks(page))
    text = (ROOT / page).read_text()
    if needs:
        first = text.index("```python")
        names = sorted(set().union(*needs.values()))[:6]
        assert ORDER_NOTE in text[:first], f"{page}: blocks {sorted(needs)} use names of earlier blocks ({names}): {ORDER_NOTE!r}"


def test_names_from_earlier_blocks_are_found():
    blocks = ["import torch\nx = torch.ones(1)\ndef f(a):\n    return a\n", "y = f(x) + torch.zeros(1)\nprint(len([y]))\n",
              "z = 1\nprint(z)\n"]
    assert names_from_earlier_blocks(blocks) == {1: {"f", "x", "torch"}}
