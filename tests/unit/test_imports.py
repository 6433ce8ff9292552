"""No import cycles between evsam_export modules, counting the imports inside functions too.

A lazy import inside a function hides a cycle from Python only until that function runs first in an
unlucky order, so the graph here is read from the source with `ast`, every `import` and `from ... import`
at any depth, and any cycle fails the test with its modules listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evsam_export

PACKAGE_ROOT = Path(evsam_export.__file__).resolve().parent


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by their __init__)."""
    files = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from` import names (relative ones resolved against `module`)."""
    if not node.level:
        return node.module or ""
    is_package = module_files()[module].name == "__init__.py"
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, source: str, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its source. `from pkg import name` is an edge to
    the submodule pkg.name when there is one, else to pkg (the name is then defined in pkg)."""
    edges = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:
                    edges.add(submodule)
                elif target in known:
                    edges.add(target)
    edges.discard(module)
    return edges


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path.read_text(), known) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each as a path
    a -> b -> ... -> a through that component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {sorted(component)}")


def test_the_graph_sees_lazy_and_relative_imports():
    source = (
        "from evsam_export.errors import CheckpointError\n"
        "def load():\n"
        "    from evsam_export.model import synthetic\n"
        "    import evsam_export.parity.validate\n"
        "    from . import variants\n"
    )
    known = {"evsam_export.errors", "evsam_export.model", "evsam_export.model.synthetic",
             "evsam_export.parity.validate", "evsam_export.model.variants", "evsam_export.model.checkpoint"}
    assert imported_modules("evsam_export.model.checkpoint", source, known) == {
        "evsam_export.errors", "evsam_export.model.synthetic", "evsam_export.parity.validate",
        "evsam_export.model.variants"}
    graph = import_graph()
    assert "evsam_export.model.sam" in graph["evsam_export.model.checkpoint"]  # imported inside a function
    assert len(graph) > 40


def test_cycle_finder_reports_a_two_module_and_a_longer_cycle():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "x": {"y"}, "y": {"z"}, "z": {"x"}, "self": set()}
    assert sorted(find_cycles(graph)) == [["a", "b", "a"], ["x", "y", "z", "x"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_between_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)
