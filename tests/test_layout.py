"""The package's shape: imports flow one way, no import circles, small modules.

Imports are read with `ast` at module level (imports inside functions are lazy by design and
cannot form a circle at import time; `if TYPE_CHECKING:` blocks are not imports at run time).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "graddoctor"
# Lower layers never import higher ones: core -> store -> diagnosis -> treat/report/serve/lab.
NEVER = {"graddoctor.core": ("graddoctor.diagnosis", "graddoctor.treat", "graddoctor.report", "graddoctor.lab",
                             "graddoctor.serve", "graddoctor.cli", "graddoctor.mirror", "graddoctor.doctor"),
         "graddoctor.store": ("graddoctor.diagnosis", "graddoctor.treat", "graddoctor.report", "graddoctor.lab",
                              "graddoctor.serve", "graddoctor.cli", "graddoctor.mirror", "graddoctor.doctor"),
         "graddoctor.diagnosis": ("graddoctor.doctor",),
         "graddoctor.treat": ("graddoctor.doctor",)}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The graddoctor modules `name` imports at module level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names) and target in modules:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_there_are_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                # a package's __init__ and its own submodules importing each other is how packages are made
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail(f"import circle: {' -> '.join(cycle)}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("lower", sorted(NEVER))
def test_lower_layers_never_import_higher_ones(lower):
    graph = _graph()
    for name, targets in graph.items():
        if name == lower or name.startswith(lower + "."):
            bad = sorted(t for t in targets if t.startswith(NEVER[lower]))
            assert not bad, f"{name} imports {bad}"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_the_detector_sees_a_circle(tmp_path, monkeypatch):
    # the oracle for the circle test: two modules importing each other are reported
    pkg = tmp_path / "graddoctor"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from . import y\n")
    (pkg / "a" / "y.py").write_text("from .x import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(pytest.fail.Exception, match="import circle: graddoctor.a.x -> graddoctor.a.y -> graddoctor.a.x"):
        test_there_are_no_import_circles()
