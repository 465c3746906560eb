"""One training run of the entry point in a subprocess (`python -m alp_trl.train`), as `alp-trl compare` and
`alp-trl study` launch them: the command, a fresh metrics log, and what came back."""

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass


TRAIN_MODULE = "alp_trl.train"


def metrics_path(output_dir: str) -> str:
    """Where a run in `output_dir` logs its metrics."""
    from .callbacks import METRICS_FILE  # here, not at the top: it imports transformers, which `--help` need not pay

    return os.path.join(output_dir, METRICS_FILE)


def train_command(
    recipe: str, output_dir: str, args: Sequence[str] = (), leading_args: Sequence[str] = ()
) -> list[str]:
    """`python -m alp_trl.train --config RECIPE [leading_args] --output_dir OUTPUT_DIR [args]`.

    A flag given twice takes its last value. `leading_args` only sets where flags appear in the command (and so in
    the command `compare` prints and `study` records): a method's flags, or the model, come before `--output_dir`."""
    return [sys.executable, "-m", TRAIN_MODULE, "--config", recipe, *leading_args, "--output_dir", output_dir, *args]


@dataclass(frozen=True)
class TrainingRun:
    """A finished training subprocess."""

    command: list[str]
    output_dir: str
    returncode: int
    seconds: float
    stderr: str = ""  # empty unless captured

    @property
    def metrics_path(self) -> str:
        return metrics_path(self.output_dir)

    @property
    def logged_command(self) -> str:
        """The command without the interpreter: `alp_trl.train --config ...`."""
        return " ".join(self.command[2:])


def launch_training_run(
    recipe: str,
    output_dir: str,
    args: Sequence[str] = (),
    *,
    leading_args: Sequence[str] = (),
    capture_output: bool = False,
    check: bool = False,
    log_prefix: str | None = None,
) -> TrainingRun:
    """Run the entry point once on `recipe` into `output_dir` and wait for it.

    A metrics log left by an earlier run in `output_dir` is removed first, so that the history read afterwards is this
    run's alone. `capture_output` keeps the run's stderr in the result (else it goes to the terminal); `check` raises
    `subprocess.CalledProcessError` on a non-zero exit; `log_prefix` prints the command, after it, before starting."""
    command = train_command(recipe, output_dir, args, leading_args)
    if os.path.exists(metrics_path(output_dir)):
        os.remove(metrics_path(output_dir))
    if log_prefix is not None:
        print(f"{log_prefix}{' '.join(command[2:])}", flush=True)
    start = time.time()
    proc = subprocess.run(command, capture_output=capture_output, text=capture_output, check=check)
    return TrainingRun(
        command=command,
        output_dir=output_dir,
        returncode=proc.returncode,
        seconds=time.time() - start,
        stderr=proc.stderr or "",
    )
