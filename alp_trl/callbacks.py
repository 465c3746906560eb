"""Trainer callbacks: a metrics log that survives interruption, and in-training avg@k evaluation."""

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

    Every process takes part: the problems are dealt out over the ranks (each rank generates and grades its share),
    and the results are gathered before they are summarised. Each rank runs the same number of generation batches,
    with transformers' `synced_gpus` under FSDP and ZeRO-3, because there a forward pass is a collective; under
    ZeRO-3 the weights are gathered for generation as TRL's trainer does. The random state is restored afterwards, so
    a run with in-training evaluation trains exactly as the same run without it.
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

    def evaluate(self) -> dict:
        """Generate, grade and summarise on every rank; returns the same summary on each, and queues it for logging."""
        import torch
        from accelerate.utils import gather_object
        from trl.models import unwrap_model_for_generation

        from .evaluate import generate_transformers, summarize
        from .rewards import grade

        trainer = self.trainer
        accelerator = trainer.accelerator
        indices = rank_share(len(self.problems), accelerator.process_index, accelerator.num_processes)
        problems = [self.problems[i % len(self.problems)] for i in indices]
        tokenizer = trainer.processing_class
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p["prompt_text"]}], tokenize=False, add_generation_prompt=True
            )
            if tokenizer.chat_template
            else p["prompt_text"]
            for p in problems
        ]
        # The evaluation's own seeded sampling must not move the random stream the training samples from.
        cuda = accelerator.device.type == "cuda"
        with (
            torch.random.fork_rng(devices=[accelerator.device] if cuda else []),
            unwrap_model_for_generation(
                trainer.model_wrapped,
                accelerator,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as model,
        ):
            was_training = model.training
            model.eval()
            completions = generate_transformers(
                model,
                tokenizer,
                prompts,
                self.k,
                self.temperature,
                self.max_new_tokens,
                self.batch_size,
                self.seed + 1_000_003 * accelerator.process_index,
                progress=accelerator.is_main_process,
            )
            model.train(was_training)
        tokenizer.padding_side = padding_side
        mine = [
            (index, [grade(text, problem["answer"])[0] == 1.0 for text in samples])
            for index, problem, samples in zip(indices, problems, completions)
            if index < len(self.problems)  # the padding that evens out the shares is not counted
        ]
        gathered = gather_object(mine) if accelerator.num_processes > 1 else mine
        correct = [row for _, row in sorted(gathered)]
        summary = summarize(correct, self.k)
        metrics = trainer._metrics["train"]
        metrics[f"eval/avg@{self.k}"].append(summary[f"avg@{self.k}"])
        metrics[f"eval/pass@{self.k}"].append(summary[f"pass@{self.k}"])
        return summary


def rank_share(num_items: int, rank: int, world_size: int) -> list[int]:
    """Indices of the items rank `rank` handles: every `world_size`-th one, padded so that every rank gets the same
    number (padding indices are `>= num_items`; map them back with `% num_items` and drop their results)."""
    per_rank = math.ceil(num_items / world_size)
    return [rank + world_size * j for j in range(per_rank)]
