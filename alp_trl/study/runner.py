"""Running a study: every unit not yet done, each result written atomically as it lands, then `results.json`
collected from the stored units (a unit without a result is listed as `not run`)."""

import json
import os
import platform
import subprocess
import time
import traceback

import torch

from .atomic_files import write_json_atomically
from .coverage_units import CoverageContext, run_checkpoint_unit, run_coverage_unit
from .engine_rollouts import VLLMEngines
from .grid import load_grid, only_experiments, plan_units
from .intervention_units import InterventionContext, run_bypass_unit, run_perturbation_unit
from .training_units import run_base_eval_unit, run_train_unit


def run_study(grid_path: str, out_dir: str, only: list[str] | None = None) -> dict:
    """Run every unit not yet done (each result written as it lands), then collect `results.json`."""
    from tqdm.auto import tqdm

    grid = load_grid(grid_path)
    units = only_experiments(plan_units(grid), only)
    experiments = {e["name"]: e for e in grid["experiments"]}
    runs_dir = os.path.join(out_dir, "units")
    os.makedirs(runs_dir, exist_ok=True)
    engines = VLLMEngines()  # one vLLM engine at a time, shared by the experiments
    context = InterventionContext(grid, out_dir, engines)
    context.coverage = CoverageContext(grid, out_dir, engines)
    todo = [u for u in units if not os.path.exists(os.path.join(runs_dir, f"{u['id']}.json"))]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="study", unit="run")
    for unit in todo:
        bar.set_postfix_str(unit["id"][-60:])
        record = run_unit(context, grid, experiments[unit["experiment"]], unit, out_dir)
        write_json_atomically(os.path.join(runs_dir, f"{unit['id']}.json"), record)
        bar.update(1)
    bar.close()
    return collect(grid, grid_path, out_dir, units)


def run_unit(context: InterventionContext, grid: dict, experiment: dict, unit: dict, out_dir: str) -> dict:
    """The record of one unit: its result, or its error and traceback when it failed (a failed run is recorded and
    shown, never dropped), with the machine, the start time and the seconds it took."""
    start = time.time()
    record = {
        "unit": unit,
        "machine": machine(),
        "commit": code_commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        if unit["type"] in ("train", "checkpoint", "eval_base"):  # a subprocess that needs the memory
            context.engines.close()
        if unit["type"] == "perturbation":
            record["result"] = run_perturbation_unit(context, experiment, unit)
        elif unit["type"] == "bypass_curve":
            record["result"] = run_bypass_unit(context, experiment, unit)
        elif unit["type"] == "coverage":
            record["result"] = run_coverage_unit(context.coverage, experiment, unit)
        elif unit["type"] == "checkpoint":
            record["result"] = run_checkpoint_unit(grid, experiment, unit, out_dir)
        elif unit["type"] == "eval_base":
            record["result"] = run_base_eval_unit(grid, experiment, unit, out_dir)
        else:
            record["result"] = run_train_unit(grid, experiment, unit, out_dir)
        record["status"] = "ok"
    except Exception as error:
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()[-3000:]
    record["seconds"] = round(time.time() - start, 1)
    return record


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} ({cpu}, {os.cpu_count()} cores, {gpu}), torch {torch.__version__}"


def code_commit() -> str | None:
    """The git commit of the alp_trl checkout that ran a unit, so that it can be rerun with the code that made it:
    `+dirty` when the package or the recipes have uncommitted changes (reports and grids being edited do not count),
    `+unknown` when that could not be told; `None` outside a git checkout."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take the index lock of a checkout being committed to

    def git(*args):
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=30, env=env)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    try:
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".", "../recipes")
        suffix = "+unknown" if status.returncode != 0 else "+dirty" if status.stdout.strip() else ""
    except subprocess.SubprocessError:
        suffix = "+unknown"
    return head.stdout.strip() + suffix


def load_records(out_dir: str, units: list[dict]) -> list[dict]:
    """Each unit's stored result, or a `not run` record where it has none yet."""
    records = []
    for unit in units:
        path = os.path.join(out_dir, "units", f"{unit['id']}.json")
        if os.path.exists(path):
            with open(path) as f:
                records.append(json.load(f))
        else:
            records.append({"unit": unit, "status": "not run"})
    return records


def collect(grid: dict, grid_path: str, out_dir: str, units: list[dict]) -> dict:
    results = {"grid": grid, "grid_path": grid_path, "records": load_records(out_dir, units)}
    write_json_atomically(os.path.join(out_dir, "results.json"), results)
    return results
