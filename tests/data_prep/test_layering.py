"""The import graph, read from the source with ``ast``: no circles, and one contract with medmae.

``data_prep`` and ``medmae`` are each checked with every import, at module level and inside functions
alike (a lazy import still makes a circle, only a hidden one); ``medmae`` and ``data_prep`` together
with their module-level imports. An import guarded by ``if TYPE_CHECKING:`` does not run and is left out.
Importing a submodule runs its parent packages' ``__init__`` too; that implicit step is not counted,
an explicit ``from package import name`` is.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The only medmae modules data_prep may import: the cache contract it writes.
ALLOWED_FROM_MEDMAE = frozenset({"medmae.data.cache"})


def _modules(*packages: str, root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` under ``root`` (a package is its
    ``__init__``)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _import_nodes(tree: ast.Module, *, in_functions: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run: module (and class) level always, function bodies on request;
    never those under ``if TYPE_CHECKING:``."""

    def visit(node: ast.AST, in_function: bool) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                if in_functions or not in_function:
                    yield child
            elif isinstance(child, ast.If) and _is_type_checking(child.test):  # only its else runs
                yield from visit(ast.Module(body=child.orelse, type_ignores=[]), in_function)
            else:
                yield from visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    yield from visit(tree, False)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """Dotted names one import statement loads: ``from a import b`` loads ``a.b`` if that is a
    module, else ``a`` (the caller maps names to the nearest known module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    for alias in node.names:
        yield f"{base}.{alias.name}"


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module in ``modules`` (None: an outside library)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph(packages: tuple[str, ...], *, in_functions: bool, root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` (under ``root``) it imports."""
    modules = _modules(*packages, root=root)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = graph.setdefault(module, set())
        for node in _import_nodes(tree, in_functions=in_functions):
            for target in _targets(module, path, node):
                known = _known(target, modules)
                if known is not None and known != module:
                    edges.add(known)
    return graph


def _cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found is not None:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found is not None:
                return found
    return None


def test_cycle_finder_finds_a_lazy_circle_and_accepts_a_tree() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    lazy = ast.parse("import os\ndef f():\n    import json\nif TYPE_CHECKING:\n    import typing\n")

    def names(in_functions: bool) -> list[str]:
        return [alias.name for node in _import_nodes(lazy, in_functions=in_functions) for alias in node.names]

    assert names(in_functions=False) == ["os"]
    assert names(in_functions=True) == ["os", "json"]


def test_data_prep_import_graph_has_no_circle() -> None:
    graph = _graph(("data_prep",), in_functions=True)
    # the graph is really read: module-level and function-level edges are both seen
    assert "data_prep.headers" in graph["data_prep.scan"]
    assert "data_prep.build" in graph["data_prep.workers"]  # the build worker's late binding
    assert _cycle(graph) is None, f"import circle in data_prep: {' -> '.join(_cycle(graph) or [])}"


def test_medmae_import_graph_has_no_circle() -> None:
    graph = _graph(("medmae",), in_functions=True)
    # the graph is really read: module-level and function-level edges are both seen
    assert "medmae.data.plane_transform" in graph["medmae.data.volume_transform"]
    assert "medmae.export.preprocessing" in graph["medmae.export.encoder"]  # read_checkpoint's late import
    assert _cycle(graph) is None, f"import circle in medmae: {' -> '.join(_cycle(graph) or [])}"


#: the import statements of the plane/volume transform pair (then medmae/export/preprocessing.py and
#: volume_preprocessing.py) before the shared card fields moved down (issue 19), at their new paths
OLD_EXPORT_PAIR = {
    "plane_transform.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from medmae.data.volume_transform import VolumePreprocessor\n"
        "def build_transform(card, where):\n"
        "    from medmae.data.volume_transform import volume_from_record\n"
    ),
    "volume_transform.py": "from medmae.data.plane_transform import _field, inference_ranges\n",
}


def test_the_old_export_circle_is_seen_only_with_function_level_imports(tmp_path: Path) -> None:
    package = tmp_path / "medmae" / "data"
    package.mkdir(parents=True)
    for name, source in OLD_EXPORT_PAIR.items():
        (package / name).write_text(source, encoding="utf-8")
    old = ["medmae.data.plane_transform", "medmae.data.volume_transform", "medmae.data.plane_transform"]
    assert _cycle(_graph(("medmae",), in_functions=True, root=tmp_path)) == old
    assert _cycle(_graph(("medmae",), in_functions=False, root=tmp_path)) is None


def test_module_level_import_graph_of_medmae_and_data_prep_has_no_circle() -> None:
    graph = _graph(("medmae", "data_prep"), in_functions=False)
    assert "medmae.data.cache" in graph["data_prep.build"], "no imports across the packages read"
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"


def test_data_prep_imports_only_the_cache_contract_from_medmae() -> None:
    medmae = _modules("medmae")
    imported = set()
    for module, path in _modules("data_prep").items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree, in_functions=True):
            for target in _targets(module, path, node):
                if target == "medmae" or target.startswith("medmae."):
                    imported.add((module, _known(target, medmae) or target))
    assert imported, "data_prep writes the medmae cache: some import of it must be seen"
    outside = sorted(f"{module} -> {target}" for module, target in imported if target not in ALLOWED_FROM_MEDMAE)
    assert not outside, f"data_prep may import only {sorted(ALLOWED_FROM_MEDMAE)} from medmae: {outside}"
