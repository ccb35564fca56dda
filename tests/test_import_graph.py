"""Dependencies inside `sara_megatron` point one way: no import cycle between its sub-packages, nor
between two of its modules.

The graph is read from the source with `ast`, not by importing: an import inside a function (or
under `if TYPE_CHECKING:`) counts like one at the top, since moving an import into a function
hides a cycle from Python without breaking it. `kernels/` is installed as `sara_megatron.kernels`
(setup.py) and is read under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path
import pytest
from launch import REPO

PACKAGE = "sara_megatron"
SOURCE_ROOTS = {PACKAGE: REPO / "sara_megatron", f"{PACKAGE}.kernels": REPO / "kernels" / "sara_kernels"}


def module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file; a package is named by its `__init__.py`."""
    files = {}
    for name, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([name, *parts])] = path
    return files


def _imported_modules(tree: ast.Module, module: str, is_package: bool,
                      modules: set[str]) -> list[tuple[str, int]]:
    """The modules of `modules` this one imports, with their lines. Relative imports resolve
    against the module's own package; `from a import b` is the module `a.b` where there is one,
    else `a`; `a.b.some_function` is the module `a.b`."""
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):  # walk: imports inside functions and branches count too
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{source}" if source else base
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.append((submodule if submodule in modules else source, node.lineno))
    found = []
    for name, line in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            found.append((name, line))
    return found


def import_graph(roots: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module of the package it imports: line of the first such import}."""
    files = module_files(roots)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = graph.setdefault(module, {})
        for target, line in _imported_modules(tree, module, path.name == "__init__.py",
                                              set(files)):
            if target != module:
                edges.setdefault(target, line)
    return graph


def subpackage(module: str) -> str:
    """`sara_megatron.data.token_shards` -> `data`; a top-level module (`sara_megatron.io`) is its
    own node; the package's `__init__` is `sara_megatron`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def subpackage_graph(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    collapsed: dict[str, set[str]] = {}
    for module, edges in graph.items():
        node = collapsed.setdefault(subpackage(module), set())
        node.update(subpackage(t) for t in edges if subpackage(t) != subpackage(module))
    return collapsed


def find_cycles(graph: dict[str, set[str] | dict[str, int]]) -> list[list[str]]:
    """The cycles of `graph` as paths `[a, b, ..., a]`: in each strongly connected component of
    more than one node, shortest cycles until every member is named. Empty when the graph is
    acyclic. Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    cycles = []
    for component in components:  # as many cycles as it takes to name every member
        left = set(component)
        while left:
            cycle = _cycle_in(graph, component, min(left))
            cycles.append(cycle)
            left -= set(cycle)
    return cycles


def _cycle_in(graph, component: set[str], start: str) -> list[str]:
    """A shortest cycle through `start` inside its component: breadth-first back to itself."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [start, node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] if node != start else [start, start]
                if child in component and child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(cycles: list[list[str]], graph: dict[str, dict[str, int]],
             roots: dict[str, Path]) -> str:
    """Each cycle as `a -> b -> a`, then the file and line of every import that makes an edge
    of it (for a sub-package cycle, every module-level import between the two)."""
    files = {module: path.relative_to(next(r for r in roots.values()
                                            if path.is_relative_to(r)).parent)
             for module, path in module_files(roots).items()}
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            for module, edges in sorted(graph.items()):
                for target, line in sorted(edges.items()):
                    if (module, target) == (a, b) or (
                            a not in graph and (subpackage(module), subpackage(target)) == (a, b)):
                        lines.append(f"    {files[module]}:{line} imports {target}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def graph():
    return import_graph(SOURCE_ROOTS)


def test_no_cycle_between_subpackages(graph):
    cycles = find_cycles(subpackage_graph(graph))
    assert not cycles, "import cycles between sub-packages:\n" + describe(cycles, graph,
                                                                          SOURCE_ROOTS)


def test_no_cycle_between_modules(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between modules:\n" + describe(cycles, graph, SOURCE_ROOTS)


def test_graph_reads_the_whole_package(graph):
    """The checked graph covers the installed kernels too, and sees real edges."""
    assert "sara_megatron.kernels.routing_js" in graph
    assert "sara_megatron.io" in graph["sara_megatron.data.token_shards"]


def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        path = root / "toy" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"toy": root / "toy"}


def test_checker_names_a_cycle_hidden_in_a_function(tmp_path):
    """`low` imports `high` only inside a function (which Python tolerates): still a cycle
    between the two sub-packages, and the message names both files and lines."""
    roots = _write_package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/base.py": "def helper():\n    from toy.high.top import user\n    return user\n",
        "high/__init__.py": "",
        "high/top.py": "from ..low import base\n\ndef user():\n    return base\n",
        "other/__init__.py": "from toy.low.base import helper\n",
    })
    graph = import_graph(roots)
    assert graph["toy.high.top"] == {"toy.low.base": 1}  # relative, resolved to the submodule
    assert graph["toy.low.base"] == {"toy.high.top": 2}  # inside the function
    cycles = find_cycles(subpackage_graph(graph))
    assert cycles == [["high", "low", "high"]]
    message = describe(cycles, graph, roots)
    assert "high -> low -> high" in message
    assert "low/base.py:2 imports toy.high.top" in message
    assert find_cycles(graph) == [["toy.high.top", "toy.low.base", "toy.high.top"]]


def test_checker_passes_an_acyclic_package(tmp_path):
    roots = _write_package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "from .base import helper\n",
        "low/base.py": "import os\n\ndef helper():\n    return os.sep\n",
        "high/__init__.py": "",
        "high/top.py": "from toy.low import helper\nfrom toy import low\n",
    })
    graph = import_graph(roots)
    assert graph["toy.high.top"] == {"toy.low": 1}
    assert graph["toy.low"] == {"toy.low.base": 1}
    assert find_cycles(graph) == [] and find_cycles(subpackage_graph(graph)) == []


def test_checker_names_every_package_of_a_larger_cycle(tmp_path):
    """Three packages in one loop plus a two-package loop through one of them: every member is
    named, each import with its line."""
    roots = _write_package(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "from toy.b import x\n",
        "b/__init__.py": "",
        "b/x.py": "import toy.c.y\n",
        "c/__init__.py": "",
        "c/y.py": "def f():\n    from toy import a\n    from toy.d import z\n",
        "d/__init__.py": "",
        "d/z.py": "from ..c import y\n",
    })
    graph = import_graph(roots)
    cycles = find_cycles(subpackage_graph(graph))
    assert sorted(map(tuple, cycles)) == [("a", "b", "c", "a"), ("d", "c", "d")]
    message = describe(cycles, graph, roots)
    assert "toy/c/y.py:2 imports toy.a" in message and "toy/d/z.py:1 imports toy.c.y" in message


# Top-level folders of a checkout that the installed package does not contain: `kernels/` is
# installed as `sara_megatron.kernels` only (setup.py), and the rest are not installed at all.
CHECKOUT_ONLY = ("kernels", "tools", "tests", "benchmarks", "examples")


def test_installed_code_imports_no_checkout_only_name():
    """An import of `kernels.x` works from the repository root (the current directory is on the
    path) but fails in a torchrun worker or an installed copy: it must be `sara_megatron.kernels`."""
    wrong = []
    for module, path in module_files(SOURCE_ROOTS).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            wrong += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
                      for name in names if name.split(".")[0] in CHECKOUT_ONLY]
    assert not wrong, "\n".join(wrong)
