"""Trainer callbacks: a metrics log that survives interruption."""

import json
import math
import os

from transformers import TrainerCallback


METRICS_FILE = "metrics.jsonl"


class MetricsJsonlCallback(TrainerCallback):
    """Append every logged dict to `<output_dir>/metrics.jsonl` as it is logged (main process only).

    The file is flushed at each line, so a run killed mid-way keeps every metric it logged; `alp-trl plot` reads it.
    A resumed run appends, after dropping lines of steps beyond the checkpoint it resumed from.
    """

    def __init__(self, output_dir: str | None = None):
        self.output_dir = output_dir

    def _path(self, args) -> str:
        return os.path.join(self.output_dir or args.output_dir, METRICS_FILE)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self._path(args)
        if os.path.exists(path) and state.global_step > 0:
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= state.global_step]
            with open(path, "w") as f:
                f.writelines(kept)
        elif os.path.exists(path) and state.global_step == 0:
            os.remove(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self._path(args)), exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            record[key] = value
        with open(self._path(args), "a") as f:
            f.write(json.dumps(record) + "\n")
