"""The `alp_trl.study` package as a whole: its modules import only the ones before them."""

import ast
from pathlib import Path

from alp_trl import study


def test_the_study_package_imports_point_down():
    """Each module of `alp_trl.study` imports only the modules before it (and `alp_trl` modules outside it)."""
    order = [
        "significance",
        "atomic_files",
        "grid",
        "engine_rollouts",
        "intervention_units",
        "coverage_units",
        "training_units",
        "figures",
        "coverage_report",
        "envelope_report",
        "report",
        "runner",
        "__init__",
        "__main__",
    ]
    folder = Path(study.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(order)
    for index, module in enumerate(order):
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = {  # `from . import main` imports the package itself, `__init__`
            node.module.split(".")[0] if node.module else "__init__"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1
        }
        assert imported <= set(order[:index]), f"{module} imports {imported - set(order[:index])}"
