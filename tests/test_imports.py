"""The package's import graph has no cycle: every module's imports of other `alp_trl` modules (at the top or inside a
function) point down."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "alp_trl"


def _graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for module in modules:
        deps = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        graph[module] = deps & modules - {module}
    return graph


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"
    assert "train" not in graph["evaluate"], "evaluate reads the prompt default from data, not from the entry point"
