"""The shape of the code: no import cycles (between modules and between packages), no oversized module, no
`pytest.raises` in tests/ that does not name the message it expects.

Read from the source with `ast`, so function-level imports count too. An import of `a.b` is an edge to
`a.b` only, not to the package `a` that Python loads first: families import `stage4.distributions.base`,
and the package module builds the catalog from them. Imports under `if TYPE_CHECKING:` are annotations
only (never executed) and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_graph() -> dict[str, set[str]]:
    files = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        edges = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for block in [
            n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
        ]:
            block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in files else node.module)
        graph[name] = {edge for edge in edges if edge in files and edge != name}
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


@pytest.mark.parametrize(
    "package", ["stage4.distributions", "stage4.dnbd3", "stage4.layers", "stage4.builders", "stage4"]
)
def test_no_import_cycles(package):
    graph = module_graph()
    cycles = [
        cycle
        for name in sorted(graph)
        if name == package or name.startswith(package + ".")
        if (cycle := cycle_through(graph, name))
    ]
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


def package_of(module: str) -> str:
    """`stage4.layers.dev` -> `stage4.layers`; a top-level module (`stage4.runner`) is a node of its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycles_between_packages():
    """The same at the granularity of stage4's packages: no package imports (through any module) a
    package that imports it back, so each package sits on a floor of its own."""
    graph: dict[str, set[str]] = {}
    for module, edges in module_graph().items():
        node = package_of(module)
        graph.setdefault(node, set()).update(package_of(e) for e in edges if package_of(e) != node)
    cycles = [cycle for name in sorted(graph) if (cycle := cycle_through(graph, name))]
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_source_file_over_450_lines():
    """A module a newcomer reads in one go: a longer one gets split along its seams."""
    long = {
        str(path.relative_to(SRC)): lines
        for path in SRC.rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > 450
    }
    assert not long, long


TESTS = Path(__file__).resolve().parent


def raises_without_match() -> list[str]:
    """`file:line` of every `pytest.raises(...)` call in tests/*.py that names no `match=`."""
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) == "pytest.raises"
                and not any(keyword.arg == "match" for keyword in node.keywords)
            ):
                found.append((path.name, node.lineno))
    return [f"{name}:{line}" for name, line in sorted(found)]


def test_every_pytest_raises_names_its_message():
    """A `pytest.raises` without `match=` passes on any error of that class, also the wrong one: each
    names the message it expects."""
    missing = raises_without_match()
    assert not missing, f"{len(missing)} pytest.raises without match=: " + ", ".join(missing)
