"""The package's import structure: no import cycles; the service below the public namespace.

The import graph is read from the source with ``ast``, not by importing it: an edge
``a -> b`` for every import in module ``a`` of a jaxreg module ``b``, wherever it is
written: at module level, inside a function (a lazy import) or under
``TYPE_CHECKING``. A lazy or type-only import hides a cycle from the interpreter, not
from a reader: the two modules still depend on each other, and neither can be read,
tested or moved without the other. ``from p import x`` is an edge to ``p.x`` when that
is a module, else to ``p``; a package's ``__init__`` is the package's module, and
importing ``a.b.c`` is not counted as importing the packages ``a`` and ``a.b``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root / package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path) -> list[tuple[str, int, str | None]]:
    """``(dotted name, line, name imported from it or None)`` of every import in the file.

    Every scope counts (module level, functions, ``TYPE_CHECKING`` blocks); relative
    imports are made absolute.
    """
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".") if is_package else module.split(".")[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            out += [(base, node.lineno, alias.name) for alias in node.names]
    return out


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line of the first such import}}`` within ``package``."""
    files = module_files(root, package)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        for name, line, member in imported_names(module, path):
            target = f"{name}.{member}" if f"{name}.{member}" in files else name
            if target in files and target != module:
                edges[target] = min(line, edges.get(target, line))
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The cycles a depth-first search closes: one per back edge, each listed from its
    smallest module name (an empty list for an acyclic graph)."""
    state: dict[str, int] = {}  # 1: on the DFS path, 2: finished
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:  # a back edge: path[nxt:] + nxt is a cycle
                cycle = path[path.index(nxt) :]
                i = cycle.index(min(cycle))
                cycles.append(cycle[i:] + cycle[:i])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]], root: Path) -> str:
    """``a (a.py:12) -> b (b.py:40) -> a``: where each import of the cycle is written."""
    files = module_files(root, cycle[0].split(".")[0])
    steps = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        steps.append(f"{a} ({files[a].relative_to(root)}:{graph[a][b]})")
    return " -> ".join(steps) + f" -> {cycle[0]}"


def top_level_package_imports(path: Path, package: str) -> list[int]:
    """Lines of ``path`` that import the top-level ``package`` itself: ``import package``
    (with or without ``as``) or ``from package import ...``, in any scope.
    ``import package.sub`` and ``from package.sub import ...`` are fine."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        plain = isinstance(node, ast.Import) and any(a.name == package for a in node.names)
        whole = isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == package
        if plain or whole:
            lines.append(node.lineno)
    return sorted(lines)


# --------------------------------------------------------------------------- jaxreg


def test_jaxreg_has_no_import_cycles():
    graph = import_graph(ROOT, "jaxreg")
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among jaxreg's modules:\n" + "\n".join(
        describe(c, graph, ROOT) for c in cycles
    )


def test_the_graph_reads_jaxreg_imports_of_every_kind():
    graph = import_graph(ROOT, "jaxreg")
    assert len(graph) > 50
    # re-exports, imports between siblings, a module named in ``from package import``
    assert "jaxreg._src.remote.custom" in graph["jaxreg.remote"]
    assert "jaxreg._src.remote.protocol" in graph["jaxreg._src.remote.custom"]
    assert "jaxreg.service.tinker_base" in graph["jaxreg.service.tinker_api"]
    assert "jaxreg.service.checkpoint" in graph["jaxreg.service.engine"]
    # a lazy import inside a function (the CLI starts the service only when asked)
    assert "jaxreg.service" in graph["jaxreg.cli"]


def test_service_does_not_import_the_top_level_package():
    """``jaxreg.service`` imports ``jaxreg._src...`` or a public submodule, never
    ``jaxreg`` itself (whose ``__init__`` re-exports everything above the service)."""
    found = {
        str(path.relative_to(ROOT)): lines
        for name, path in module_files(ROOT, "jaxreg").items()
        if name.startswith("jaxreg.service")
        and (lines := top_level_package_imports(path, "jaxreg"))
    }
    assert not found, (
        "jaxreg.service imports the top-level package (import from jaxreg._src... or the "
        f"public submodule instead): {found}"
    )


# --------------------------------------------------------------------------- the checks


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cycles_hidden_in_functions_and_type_checking_are_found(tmp_path):
    _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def f():\n    from pkg.c import x\n    return x\n",
            "pkg/c.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\nx = 1\n"
            ),
            "pkg/sub/__init__.py": "from . import d\n",
            "pkg/sub/d.py": "import pkg.sub\n",
            "pkg/e.py": "import pkg.a\nfrom pkg import sub\nfrom pkg.sub import d\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b": 1}
    assert graph["pkg.b"] == {"pkg.c": 2}
    assert graph["pkg.c"] == {"pkg.a": 3}
    assert graph["pkg.e"] == {"pkg.a": 1, "pkg.sub": 2, "pkg.sub.d": 3}
    assert sorted(find_cycles(graph)) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.sub", "pkg.sub.d"]]
    assert describe(["pkg.a", "pkg.b", "pkg.c"], graph, tmp_path) == (
        "pkg.a (pkg/a.py:1) -> pkg.b (pkg/b.py:2) -> pkg.c (pkg/c.py:3) -> pkg.a"
    )


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {}}, []),
        ({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}}, []),  # a diamond is no cycle
        ({"a": {"a2": 1}, "a2": {"b": 1}, "b": {"a": 1}}, [["a", "a2", "b"]]),
        ({"x": {"y": 1}, "y": {"x": 1, "z": 1}, "z": {"y": 1}}, [["x", "y"], ["y", "z"]]),
    ],
)
def test_find_cycles(edges, expected):
    assert sorted(find_cycles(edges)) == expected


def test_top_level_package_imports_are_found(tmp_path):
    _package(
        tmp_path,
        {
            "m.py": (
                "import jaxreg as jr\n"  # 1
                "import jaxreg.remote\n"  # fine: a submodule
                "from jaxreg import Term\n"  # 3
                "from jaxreg._src.core import term\n"  # fine
                "def f():\n"
                "    import jaxreg\n"  # 6
                "    from jaxreg import remote\n"  # 7
                "import jaxregx\n"  # another package
            )
        },
    )
    assert top_level_package_imports(tmp_path / "m.py", "jaxreg") == [1, 3, 6, 7]
