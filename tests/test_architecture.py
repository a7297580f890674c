"""The package's import rules: client and server apart, shared layers below both, no circles.

Every import is read from the source (inside functions and `TYPE_CHECKING` blocks too), so
a lazy import cannot hide an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fl_lightning"
# Layers by the first part of the module path below `fl_lightning`.
CLIENT = {"client", "client_app"}
SERVER = {"server", "server_app"}
SHARED = {"config", "data", "models", "privacy", "vocabulary", "errors", "files", "seeding"}
LEAVES = {"vocabulary", "errors", "files", "seeding"}  # import nothing of ours


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (`fl_lightning.server.census`)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "project_template" in path.parts:
            continue  # files `fl-lightning init` copies, not modules of the package
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The package's modules `name` imports, wherever in its source the import stands."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("fl_lightning.") and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> str:
    """The first part of a module path below the package: `server`, `config`, `cli`..."""
    return name.removeprefix("fl_lightning.").split(".")[0]


def faces(name: str) -> bool:
    """A package's `__init__` that re-exports its modules (`fl_lightning.config`)."""
    return MODULES[name].name == "__init__.py"


def test_every_folder_of_modules_is_a_package() -> None:
    # Without its __init__.py a folder still imports (a namespace package) in a checkout,
    # but a built wheel leaves it out: a clean clone once lacked fl_lightning/data's.
    folders = {path.parent for path in MODULES.values()}
    assert not [f for f in folders if not (f / "__init__.py").is_file()]


def test_every_module_is_found() -> None:
    assert "fl_lightning.server.census" in MODULES and "fl_lightning.cli" in MODULES


@pytest.mark.parametrize(
    ("side", "forbidden"),
    [(CLIENT, SERVER | {"run", "cli"}), (SERVER, CLIENT | {"run", "cli"})],
    ids=["client", "server"],
)
def test_client_and_server_never_import_each_other(side: set[str], forbidden: set[str]) -> None:
    # Through any chain of imports: a ClientApp process loads nothing of the server's.
    crossings = sorted(
        f"{name} -> {target}"
        for name in GRAPH
        if layer(name) in side
        for target in closure(name)
        if layer(target) in forbidden
    )
    assert crossings == []


def closure(name: str) -> set[str]:
    """Every module `name` imports, directly or through others."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        for target in GRAPH[current]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_shared_layers_import_neither_side() -> None:
    crossings = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if layer(name) in SHARED
        for target in targets
        if layer(target) not in SHARED
    )
    assert crossings == []


def test_lower_layers_stay_below() -> None:
    rules = {
        "data": {"models", "privacy"},
        "privacy": {"data", "models"},
        "config": {"data", "models", "privacy"},
    }
    crossings = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if layer(target) in rules.get(layer(name), set())
    )
    assert crossings == []
    leaves = sorted(f"{n} -> {t}" for n in GRAPH if layer(n) in LEAVES for t in GRAPH[n])
    assert leaves == []


def test_only_the_command_line_starts_runs() -> None:
    starters = sorted(
        name
        for name, targets in GRAPH.items()
        if layer(name) not in {"run", "cli"} and any(layer(t) == "run" for t in targets)
    )
    assert starters == []


def test_the_server_never_builds_a_clients_training_data() -> None:
    uses = sorted(
        name
        for name in GRAPH
        if layer(name) in SERVER
        and "client_data" in MODULES[name].read_text().split("import", 1)[-1]
        and "fl_lightning.data.loaders" in GRAPH[name]
    )
    assert uses == []


def test_there_is_no_import_circle() -> None:
    # A face (`config/__init__.py`) imports its own modules: followed through, it would make
    # every module that imports `fl_lightning.config.x` a part of a circle.
    graph = {n: {t for t in ts if not faces(t)} for n, ts in GRAPH.items()}
    circles = _cycles(graph)
    assert circles == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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
            visit(node)
    return found


# The house rule for size; an exception must say in its commit why it is clearer whole.
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 150


def test_no_function_or_class_is_over_its_size() -> None:
    too_long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert not too_long, too_long
