"""The package's import graph has no cycle: every module's imports of other `alp_trl` modules (at the top or inside a
function; relative with one or more dots, or absolute), sub-packages (`alp_trl/study/`) included, point down. And
README's module map names every module."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "alp_trl"


def _module_names(package: Path) -> dict[str, Path]:
    """Every module of `package` by its dotted name inside it (`"trainer"`, `"study"` for `study/__init__.py`,
    `"study.grid"`); the top package's own `__init__` is left out (every module imports it first)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names[".".join(parts)] = path
    return names


def _imported(node, importer: str, is_package: bool, modules: set[str], top: str) -> set[str]:
    """The modules of the package that one import statement of `importer` names."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
        return {t.removeprefix(top + ".") for t in targets if t.startswith(top + ".")} & modules
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level == 0:
        if node.module is None or not (node.module == top or node.module.startswith(top + ".")):
            return set()
        base = node.module.removeprefix(top).lstrip(".").split(".") if node.module != top else []
    else:
        here = importer.split(".") if is_package else importer.split(".")[:-1]  # the importer's package
        if node.level - 1 > len(here):
            raise AssertionError(f"{importer}: relative import beyond the package")
        base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    named = ".".join(base)
    # `from pkg import name`: `name` is a submodule when one is called so, else an attribute of `pkg` (which then
    # must have finished importing)
    submodules = {f"{named}.{a.name}".lstrip(".") for a in node.names} & modules
    if named in modules and len(submodules) < len(node.names):
        submodules.add(named)
    return submodules


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. Importing a submodule imports its parent packages first, so a
    module outside `study` that imports `study.grid` depends on `study` too (a module inside it does not: its package
    is already being imported)."""
    paths = _module_names(package)
    modules = set(paths)
    graph = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            deps |= _imported(node, module, is_package, modules, package.name)
        for dep in list(deps):
            parts = dep.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and not (module == parent or module.startswith(parent + ".")):
                    deps.add(parent)
        graph[module] = deps - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

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
    return cycles


def test_no_import_cycle():
    graph = _graph()
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"
    assert "train" not in graph["evaluate"], "evaluate reads the prompt default from data, not from the entry point"


# The experiment tools of README's module map: they use the trainer, never the other way round.
EXPERIMENT_TOOLS = {"train", "cli", "callbacks", "plots", "evaluate", "intervention", "marginal_coverage", "compare"}
EXPERIMENT_TOOLS |= {"train_launch", "study"}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_trainer_imports_no_experiment_tool():
    graph = _graph()
    for core in ("trainer", "config", "objectives", "rollout_denominator", "sigma_persistence"):
        below = _reachable(graph, core)
        assert not {m for m in below if m.split(".")[0] in EXPERIMENT_TOOLS}, core


def test_the_graph_covers_the_study_package_and_imports_with_two_dots():
    graph = _graph()
    assert {"study", "study.grid", "study.report", "study.runner", "study.__main__"} <= set(graph)
    assert {"model_loading", "intervention", "study.grid"} <= graph["study.intervention_units"], "`..x` and `.x`"
    assert graph["study.__main__"] == {"study"}, "`from . import main` in a sub-package names the package"
    assert {"study.grid", "study.report", "study.runner"} <= graph["study"]


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, cycle",
    [
        (  # a sub-package's module importing a top-level module that imports it back
            {"a.py": "from .sub.b import f\n", "sub/__init__.py": "", "sub/b.py": "from ..a import g\n"},
            ["a", "sub.b", "a"],
        ),
        (  # through the sub-package's __init__: importing sub.b runs sub/__init__.py first
            {"a.py": "def g(): from .sub.b import f\n", "sub/__init__.py": "from ..a import g\n", "sub/b.py": ""},
            ["a", "sub", "a"],
        ),
        (  # absolute imports of the package count too
            {"a.py": "import pkg.b\n", "b.py": "from pkg import a\n"},
            ["a", "b", "a"],
        ),
    ],
)
def test_a_cycle_through_a_sub_package_is_found(tmp_path, files, cycle):
    package = _write(tmp_path / "pkg", {"__init__.py": "", **files})
    assert _cycles(_graph(package)) == [cycle]


def test_imports_inside_one_sub_package_are_not_a_cycle(tmp_path):
    package = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "base.py": "",
            "sub/__init__.py": "from .b import f\nfrom .c import h\n",
            "sub/b.py": "from ..base import x\ndef f(): pass\n",
            "sub/c.py": "from .b import f\nfrom . import b\n",
            "sub/__main__.py": "from . import main\n",
        },
    )
    graph = _graph(package)
    assert graph == {
        "base": set(),
        "sub": {"sub.b", "sub.c"},
        "sub.b": {"base"},
        "sub.c": {"sub.b"},
        "sub.__main__": {"sub"},
    }
    assert _cycles(graph) == []


def test_the_readme_module_map_names_every_module():
    """README's module map ("## Design") stays in step with the package: one entry per top-level module, `study/` for
    the sub-package."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("**Module map.**") : readme.index("The math lives in pure functions")]
    mapped = {line.split("`")[1] for line in section.splitlines() if line.startswith("  - `")}
    top_level = {path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}
    sub_packages = {f"{path.parent.name}/" for path in PACKAGE.glob("*/__init__.py")}
    assert mapped == top_level | sub_packages


def _is_reexport_shim(path: Path) -> bool:
    """A module kept for old imports: a docstring and imports, nothing else."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) or isinstance(n, ast.Expr) for n in body)


def test_the_tests_mirror_the_package():
    """Every module of the package with code of its own has its test file at the mirrored path
    (`alp_trl/study/grid.py` -> `tests/study/test_grid.py`); re-export shims and entry points (`__main__`) need none."""
    tests = PACKAGE.parent / "tests"
    missing = []
    for module, path in _module_names(PACKAGE).items():
        parts = module.split(".")
        if path.name in ("__init__.py", "__main__.py") or _is_reexport_shim(path):
            continue
        expected = tests.joinpath(*parts[:-1], f"test_{parts[-1]}.py")
        if not expected.exists():
            missing.append(str(expected.relative_to(PACKAGE.parent)))
    assert not missing, f"modules without their mirrored test file: {missing}"
    assert _is_reexport_shim(PACKAGE / "rollout_mismatch.py") and not _is_reexport_shim(PACKAGE / "trainer.py")
