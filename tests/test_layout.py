"""The package's shape, read from its source: imports run one way, modules stay small, folders only re-export.

docs/architecture.md explains the layers; these tests keep the code to it. Every import counts,
including those inside functions: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

import timm_exits

PACKAGE = pathlib.Path(timm_exits.__file__).parent

# The layers, low to high: a module imports only from its own layer's folder or from lower layers.
# Folders in one layer (losses and cost; plots and integrations) do not import each other.
LAYERS = [
    {"version", "_checks", "_progress"},
    {"ensemble", "data"},
    {"fx"},
    {"heads"},
    {"model"},
    {"losses", "cost"},
    {"runtime"},
    {"calibration"},
    {"deploy"},
    {"plots", "integrations"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
# The convenience methods on MultiExitModel that reach up, each inside its method with a comment saying why.
UPWARD_ALLOWED = {
    ("model.multi_exit", "runtime.early_exit"),  # model.early_exit(...)
    ("model.multi_exit", "deploy.hub"),  # model.save_pretrained(...)
}
MAX_LINES = 400


def modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name under timm_exits ('' for the package itself)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: pathlib.Path) -> list[tuple[str, list[str], int, bool]]:
    """(imported module under timm_exits, names taken from it, line, inside a function) for each import of the package's own code."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    lazy = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for sub in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "timm_exits":
                base = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(base)
            names = [a.name for a in node.names]
            if target in modules() and all(f"{target}.{n}".lstrip(".") in modules() for n in names):  # from . import module
                found += [(f"{target}.{n}".lstrip("."), [], node.lineno, id(node) in lazy) for n in names]
            else:
                found.append((target, names, node.lineno, id(node) in lazy))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "timm_exits":
                    found.append((".".join(alias.name.split(".")[1:]), [], node.lineno, id(node) in lazy))
    return found


def layer(name: str) -> int:
    top = name.split(".")[0]
    return next(k for k, folders in enumerate(LAYERS) if top in folders)


def test_every_module_has_a_layer():
    assert [name for name in modules() if name and name.split(".")[0] not in set().union(*LAYERS)] == []


def test_imports_run_one_way_inside_functions_too():
    upward, across = [], []
    for name, path in modules().items():
        if not name:  # the package's __init__ re-exports every layer
            continue
        for target, _, line, _ in imports(name, path):
            if not target or target.split(".")[0] == name.split(".")[0]:
                continue
            if layer(target) > layer(name) and (name, target) not in UPWARD_ALLOWED:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
            elif layer(target) == layer(name):
                across.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert upward == [], "a lower layer imports a higher one (docs/architecture.md):\n" + "\n".join(upward)
    assert across == [], "two folders of one layer import each other:\n" + "\n".join(across)


def test_the_upward_imports_allowed_are_lazy_and_say_why():
    for name, target in UPWARD_ALLOWED:
        path = modules()[name]
        lines = path.read_text().splitlines()
        found = [(line, lazy) for t, _, line, lazy in imports(name, path) if t == target]
        assert found, f"{name} no longer imports {target}: drop it from UPWARD_ALLOWED"
        for line, lazy in found:
            assert lazy and "#" in lines[line - 1], (
                f"{path.name}:{line}: an upward import sits inside the method that needs it, with a comment")


def test_modules_inside_a_folder_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        top = name.split(".")[0]
        graph[name] = {t for t, _, _, _ in imports(name, path) if t and t.split(".")[0] == top and t != name and t != top}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("an import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else nxt)
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_imports_another_modules_private_names():
    private = [f"{path.relative_to(PACKAGE.parent)}:{line} takes {n} from {target}"
               for name, path in modules().items() for target, names, line, _ in imports(name, path)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_each_folder_init_only_re_exports():
    for path in modules().values():
        if path.name != "__init__.py":
            continue
        body = ast.parse(path.read_text()).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        kinds = {type(node).__name__ for node in body
                 if not (isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["__all__"])}
        assert kinds <= {"ImportFrom"}, f"{path.relative_to(PACKAGE.parent)} holds {sorted(kinds)}: code belongs in a module of the folder"


def test_no_module_is_two_ideas():
    long = {f"{path.relative_to(PACKAGE.parent)}": n
            for path in modules().values() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines; split by idea"


def test_lazy_imports_say_why():
    """A function-level import of another package carries a comment (on its line or the line before) that says why it waits."""
    silent = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            import_lines = {s.lineno for s in ast.walk(node) if isinstance(s, (ast.Import, ast.ImportFrom))}
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    here, before = lines[sub.lineno - 1], lines[sub.lineno - 2].strip()
                    if "#" not in here and not before.startswith("#") and not ("import" in before and sub.lineno - 1 in import_lines):
                        silent.append(f"{path.relative_to(PACKAGE.parent)}:{sub.lineno}: {here.strip()}")
    assert silent == []


def test_the_version_is_written_once():
    from timm_exits.version import __version__

    assert timm_exits.__version__ == __version__
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'version = {attr = "timm_exits.version.__version__"}' in pyproject and '\nversion = "' not in pyproject


def test_every_planted_bug_is_in_place():
    # tools/planted_bugs.py plants each bug by replacing one exact text: a change that moves the text leaves
    # `make planted-bugs` (not in CI) unable to plant it, which would otherwise show only when someone runs it
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("planted_bugs", PACKAGE.parent / "tools" / "planted_bugs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("planted_bugs", module)
    spec.loader.exec_module(module)
    assert {bug.name: found for bug in module.BUGS if (found := module.problems(bug, PACKAGE.parent))} == {}
