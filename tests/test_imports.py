"""The package's import graph: no cycles (lazy imports inside functions count), and the sharding engine
imports nothing of Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_zero"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``lightning_zero`` module or ``lightning`` import in ``path``, wherever it sits in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {other for other in _imports(path) if other in modules and other != name}
            for name, path in modules.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    # A package's __init__ re-exports its modules: edges into it from its own modules are not cycles.
    graph = {name: {other for other in edges if not name.startswith(other + ".")} for name, edges in graph.items()}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycles.append([*path[path.index(other):], other] if other in path else [name, other])
            elif other not in state:
                visit(other, [*path, other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_engine_knows_nothing_of_lightning() -> None:
    for path in (PACKAGE / "sharding").glob("*.py"):
        lightning = sorted(name for name in _imports(path) if name.split(".")[0] in ("lightning", "pytorch_lightning"))
        assert not lightning, (path.name, lightning)
