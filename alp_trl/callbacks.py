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


class AvgAtKCallback(TrainerCallback):
    """In-training evaluation: every `every` optimizer steps, avg@k / pass@k of the current policy (no noise) on a
    small problem set, logged with the next training log as `eval/avg@k` and `eval/pass@k`.

    Generation runs on the main process with the unwrapped model (not supported under DeepSpeed ZeRO-3, where the
    weights are partitioned: use `alp-trl eval` on checkpoints there).
    """

    def __init__(
        self,
        trainer,
        problems: list[dict],
        k: int = 4,
        temperature: float = 0.6,
        max_new_tokens: int = 256,
        every: int = 50,
        batch_size: int = 32,
        seed: int = 0,
    ):
        self.trainer, self.problems, self.k = trainer, problems, k
        self.temperature, self.max_new_tokens, self.every = temperature, max_new_tokens, every
        self.batch_size, self.seed = batch_size, seed

    def on_step_end(self, args, state, control, **kwargs):
        if self.every > 0 and state.global_step % self.every == 0:
            self.evaluate()

    def evaluate(self) -> dict | None:
        from .evaluate import generate_transformers, summarize
        from .rewards import grade

        trainer = self.trainer
        if not trainer.accelerator.is_main_process:
            return None
        if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return None
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = trainer.processing_class
        was_training = model.training
        model.eval()
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p["prompt_text"]}], tokenize=False, add_generation_prompt=True
            )
            if tokenizer.chat_template
            else p["prompt_text"]
            for p in self.problems
        ]
        completions = generate_transformers(
            model, tokenizer, prompts, self.k, self.temperature, self.max_new_tokens, self.batch_size, self.seed
        )
        tokenizer.padding_side = padding_side
        model.train(was_training)
        correct = [
            [grade(text, p["answer"])[0] == 1.0 for text in samples] for p, samples in zip(self.problems, completions)
        ]
        summary = summarize(correct, self.k)
        metrics = trainer._metrics["train"]
        metrics[f"eval/avg@{self.k}"].append(summary[f"avg@{self.k}"])
        metrics[f"eval/pass@{self.k}"].append(summary[f"pass@{self.k}"])
        return summary
