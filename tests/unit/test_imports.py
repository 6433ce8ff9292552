"""No import cycles between evsam_export modules, and no import from a lower layer to a higher one,
counting the imports inside functions too.

A lazy import inside a function hides a cycle from Python only until that function runs first in an
unlucky order, so the graph here is read from the source with `ast`, every `import` and `from ... import`
at any depth, and any cycle fails the test with its modules listed.

Layers: a unit is a sub-package (`evsam_export/model/`) or a top-level module (`evsam_export/errors.py`).
LAYERS lists them lowest first; a unit may import itself and the units listed before it, nothing after it,
with no exceptions. A lower layer that needs something from a higher one gets it passed in (a function on
the step context, an argument). docs/design.md's "Layers" section lists the same units in the same order.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import evsam_export

PACKAGE_ROOT = Path(evsam_export.__file__).resolve().parent
DESIGN = PACKAGE_ROOT.parent / "docs" / "design.md"


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


# ------------------------------------------------------------------------------------------ layers

LAYERS = (
    "evsam_export",  # the package's own __init__: the version
    "errors",
    "progress",
    "signal_stack",
    "junit",
    "files",
    "cache",
    "output",
    "folder_report",
    "environment",
    "measurements",
    "model",
    "metrics",
    "contract",
    "manifest",
    "apps",
    "data",
    "realistic",
    "overlay",
    "export",
    "web",
    "runners",
    "runtime",
    "bench",
    "steps",
    "precision",
    "targets",
    "evaluation",
    "parity",
    "pipeline",
    "api",
    "cli",
    "docs_gen",
)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported evsam_export module, line) for every import in the file; `from pkg import name` counts as
    an import of pkg.name when that is a module, else of pkg."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "evsam_export"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "evsam_export":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in known else target, node.lineno))
    return found


def layer_violations(layers: tuple[str, ...] = LAYERS) -> list[str]:
    rank = {unit: position for position, unit in enumerate(layers)}
    files = module_files()
    known = set(files)
    problems = []
    for module, path in files.items():
        source_unit = unit_of(module)
        if source_unit not in rank:
            problems.append(f"{module}: its unit {source_unit!r} has no place in LAYERS")
            continue
        for target, line in imports_of(module, path, known):
            target_unit = unit_of(target)
            if target_unit not in rank:
                problems.append(f"{module}:{line} imports {target}, whose unit {target_unit!r} has no place in LAYERS")
            elif rank[target_unit] > rank[source_unit]:
                problems.append(f"{module}:{line} imports {target}: {source_unit} may not import the higher {target_unit}")
    return problems


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    problems = layer_violations()
    assert not problems, "\n".join(problems)


def test_every_unit_in_the_layers_exists():
    units = {unit_of(module) for module in module_files()}
    assert sorted(set(LAYERS) - units) == []
    assert len(set(LAYERS)) == len(LAYERS)


def test_the_check_sees_lazy_imports_and_upward_edges():
    files = module_files()
    graph = {module: {target for target, _ in imports_of(module, path, set(files))} for module, path in files.items()}
    assert "evsam_export.model.sam" in graph["evsam_export.model.checkpoint"]  # imported inside a function
    swapped = list(LAYERS)
    low, high = swapped.index("model"), swapped.index("contract")
    swapped[low], swapped[high] = swapped[high], swapped[low]
    assert any("contract may not import the higher model" in problem for problem in layer_violations(tuple(swapped)))


def test_design_doc_lists_the_layers_in_order():
    text = DESIGN.read_text()
    section = text[text.index("\n## Layers\n"):]
    following = section.find("\n## ", 1)
    section = section[: following if following > 0 else None]
    listed = []
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")] if row.startswith("|") else []
        if cells:
            listed += re.findall(r"`([a-z_]+)(?:/|\.py)?`", cells[0])
    assert tuple(listed) == LAYERS
