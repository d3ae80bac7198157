"""The package layout is the architecture: these tests keep its import rules true.

The import graph is read from the source (ast), not by importing: an edge is an import
that runs when a module is imported (module level and class bodies, not function bodies,
not `if TYPE_CHECKING:` blocks). Lazy imports inside functions are how the CLI composes
packages, so only the import-time graph must be acyclic and point one way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "exporters", "devices", "cloud_sync")
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, *, import_time_only: bool) -> set[str]:
    """What `module` imports: modules of ours by full name, others by their dotted name."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    if not import_time_only:
        for node in ast.walk(tree):  # type-only imports are not imports
            if isinstance(node, ast.If) and _is_type_checking(node):
                node.body = []
        return {name for node in ast.walk(tree) for name in _names_of(node, package)}
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            found.update(_names_of(node, package))
            if isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def _names_of(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return []


def _graph(import_time_only: bool = True) -> dict[str, set[str]]:
    return {module: {m for m in _imports(module, import_time_only=import_time_only)
                     if m in MODULES and m != module}
            for module in MODULES}


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_graph_reader_sees_a_known_edge_and_a_known_lazy_import():
    graph = _graph()
    assert "runtime.models.bundle" in graph["runtime.daemon.server"]
    # the CLI composes exporters lazily: inside the command, not at import time
    assert "exporters.zoo" not in graph["runtime.cli.serve"]
    assert "exporters.zoo" in _graph(import_time_only=False)["runtime.cli.serve"]


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_at_import_time():
    assert _cycles(_graph()) == []


def test_no_import_circles_even_through_lazy_imports():
    assert _cycles(_graph(import_time_only=False)) == []


def test_runtime_never_imports_exporters_or_cloud_sync_at_import_time():
    upward = {(module, target) for module, targets in _graph().items()
              if _within(module, "runtime") for target in targets
              if _within(target, "exporters", "cloud_sync")}
    assert upward == set()


def test_only_the_cli_reaches_exporters_or_cloud_sync_from_runtime_even_lazily():
    reaching = {(module, target) for module, targets in _graph(import_time_only=False).items()
                if _within(module, "runtime") and not _within(module, "runtime.cli")
                for target in targets if _within(target, "exporters", "cloud_sync")}
    assert reaching == set()


def test_devices_is_a_leaf():
    ours = {(module, target) for module, targets in _graph(import_time_only=False).items()
            if _within(module, "devices") for target in targets
            if _within(target, "runtime", "exporters", "cloud_sync")}
    assert ours == set()


@pytest.mark.parametrize("package", ["runtime.daemon", "runtime.client", "runtime.models",
                                     "runtime.engines", "runtime.tasks", "runtime.spatial"])
def test_core_packages_never_import_the_tools_or_the_cli(package):
    reaching = {(module, target) for module, targets in _graph(import_time_only=False).items()
                if _within(module, package) for target in targets
                if _within(target, "runtime.tools", "runtime.cli", "exporters", "cloud_sync")}
    assert reaching == set()


def test_client_sdk_reaches_nothing_of_the_daemon_at_import_time():
    graph = _graph()
    seen, todo = set(), [m for m in MODULES if _within(m, "runtime.client")]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert {m for m in seen if _within(m, "runtime.daemon", "runtime.engines")} == set()
    third_party = set().union(*(_imports(m, import_time_only=True) for m in seen))
    assert {"onnxruntime", "cloud_sync", "exporters"} & {n.split(".")[0] for n in third_party} \
        == set()


def test_every_runtime_module_is_under_the_size_limit():
    long = {str(path.relative_to(ROOT)): lines for module, path in MODULES.items()
            if _within(module, "runtime")
            and (lines := len(path.read_text().splitlines())) >= MAX_MODULE_LINES}
    assert long == {}


def test_every_package_says_what_it_is_for_and_may_import():
    silent = [name for name, path in MODULES.items()
              if path.name == "__init__.py" and not ast.get_docstring(ast.parse(path.read_text()))]
    assert silent == []
