"""The units of a `coverage` experiment: the marginal-coverage test (`alp_trl.marginal_coverage`) per checkpoint,
engine and seed, and the training of a checkpoint the experiment measures (e.g. a sharpened policy).

Engines: `engine_rollouts` (a simulated one, or the real vLLM engine). Rollouts are cached in
`DIR/cache/<unit id>.pt` and kept, so the tables can be recomputed; an engine's scale (the sigma whose single draw is
as far from the policy as the engine, `matched_sigma`) is computed once per checkpoint and engine, from the first
seed's rollouts, and cached beside them.
"""

import json
import os

import torch

from ..intervention import RolloutBatch, policy_logps, prepared_prompts
from ..marginal_coverage import coverage, joint, kl_to_inference, matched_sigma
from .atomic_files import save_torch_atomically, write_json_atomically
from .engine_rollouts import VLLMEngines, sample_engine_rollouts
from .grid import engine_id


BASE_CHECKPOINT = "base"


class CoverageContext:
    """The model of the checkpoint being measured (one at a time) and the vLLM engine of it, loaded when needed
    (`engines`: shared with the other experiments of the study)."""

    def __init__(self, grid: dict, out_dir: str, engines: VLLMEngines | None = None):
        self.grid, self.out_dir = grid, out_dir
        self.engines = engines or VLLMEngines()
        self._model_path = self._model = self._tokenizer = None

    def checkpoint_path(self, experiment: dict, checkpoint: str) -> str:
        """The grid's model for `base`, else the final model of the experiment's `checkpoint` unit."""
        if checkpoint == BASE_CHECKPOINT:
            return self.grid["model"]
        return os.path.join(self.out_dir, "checkpoints", f"{experiment['name']}__{checkpoint}")

    def model(self, path: str):
        if self._model_path != path:
            from ..model_loading import load_policy

            self._model, self._tokenizer = load_policy(path)
            self._model_path = path
        return self._model, self._tokenizer


def prompts_of(tokenizer, data: dict) -> list:
    """The experiment's prompts (chat messages for a chat model), from its `data` settings."""
    return prepared_prompts(tokenizer, data)["prompt"]


def unit_rollouts(context: CoverageContext, experiment: dict, unit: dict) -> list[RolloutBatch]:
    """The unit's rollouts from its engine: sampled once, then read from `DIR/cache/<unit id>.pt`."""
    path = os.path.join(context.out_dir, "cache", f"{unit['id']}.pt")
    if os.path.exists(path):
        return [RolloutBatch(*batch) for batch in torch.load(path, weights_only=False)["batches"]]
    data, engine, seed = experiment.get("data", {}), unit["engine"], unit["seed"]
    model_path = context.checkpoint_path(experiment, unit["checkpoint"])
    model, tokenizer = context.model(model_path)
    batches = sample_engine_rollouts(
        model, tokenizer, context.engines, model_path, prompts_of(tokenizer, data), engine, data, seed
    )
    save_torch_atomically({"batches": [tuple(b) for b in batches], "engine": engine, "seed": seed}, path)
    return batches


def engine_scale(context: CoverageContext, experiment: dict, unit: dict, model, batches) -> dict:
    """The engine's scale in sigma units, absolute and rms (`matched_sigma` against the engine's KL to the policy),
    from this checkpoint and engine's first measured rollouts; cached."""
    from ..perturbation import LayerwisePerturbation

    name = f"{experiment['name']}__{unit['checkpoint']}__{engine_id(unit['engine'])}__scale.json"
    path = os.path.join(context.out_dir, "cache", name)
    scale = {}
    if os.path.exists(path):
        with open(path) as f:
            scale = json.load(f)
    missing = [n for n in experiment.get("noise_scales", ["absolute", "rms"]) if n not in scale]
    if not missing:
        return scale
    temperature = experiment.get("data", {}).get("temperature", 1.0)
    if not scale:  # measured on the rollouts of the first unit that needs it (its seed is recorded)
        unperturbed = policy_logps(model, batches, None, temperature)
        rollout, mask = joint(batches, "rollout_logps"), joint(batches, "completion_mask")
        scale = {"engine_kl_k3": kl_to_inference(unperturbed, rollout, mask)["kl_k3"], "from_seed": unit["seed"]}
    engine_kl = {"kl_k3": scale["engine_kl_k3"]}
    for noise_scale in missing:

        def attach(sigma, noise_scale=noise_scale):
            return LayerwisePerturbation.attach(
                model, sigma_init=sigma, noise_scale=noise_scale, learnable=False, seed=unit["seed"]
            )

        scale[noise_scale] = matched_sigma(model, attach, batches, engine_kl["kl_k3"], temperature=temperature)
    write_json_atomically(path, scale)
    return scale


def run_coverage_unit(context: CoverageContext, experiment: dict, unit: dict) -> dict:
    """The marginal-coverage test of one checkpoint, engine and seed, at every sigma of the experiment
    (`sigma_multipliers` x the engine's scale, per `noise_scales`), each with `draws` noise draws."""
    from ..perturbation import LayerwisePerturbation

    batches = unit_rollouts(context, experiment, unit)
    model, _ = context.model(context.checkpoint_path(experiment, unit["checkpoint"]))
    scale = engine_scale(context, experiment, unit, model, batches)
    temperature = experiment.get("data", {}).get("temperature", 1.0)
    draws = experiment.get("draws", 8)
    configs = []
    for noise_scale in experiment.get("noise_scales", ["absolute", "rms"]):
        for multiplier in experiment.get("sigma_multipliers", [0.5, 1, 2]):
            sigma = multiplier * scale[noise_scale]
            perturbation = LayerwisePerturbation.attach(
                model, sigma_init=sigma, noise_scale=noise_scale, learnable=False, seed=unit["seed"]
            )
            try:
                measured = coverage(model, perturbation, batches, draws, key=7_000, temperature=temperature)
            finally:
                perturbation.detach()
            rows = {k: vars(v) for k, v in measured.items() if hasattr(v, "kl_k3")}
            extras = {k: v for k, v in measured.items() if not hasattr(v, "kl_k3")}
            configs.append(
                {"noise_scale": noise_scale, "multiplier": multiplier, "sigma": sigma, "rows": rows, **extras}
            )
    mask = joint(batches, "completion_mask")
    return {"scale": scale, "num_tokens": int(mask.sum()), "draws": draws, "configs": configs}


def run_checkpoint_unit(grid: dict, experiment: dict, unit: dict, out_dir: str) -> dict:
    """Train the experiment's `checkpoint` (its `recipe` and `overrides`) from the grid's model and save it."""
    from ..plots import load_history
    from ..train_launch import launch_training_run

    spec = experiment["checkpoints"][unit["checkpoint"]]
    run_dir = os.path.join(out_dir, "checkpoints", f"{experiment['name']}__{unit['checkpoint']}")
    args = ["--seed", str(spec.get("seed", 0)), "--auto_resume", "false", "--plot", "false", "--save_strategy", "no"]
    for key, value in spec.get("overrides", {}).items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    run = launch_training_run(
        spec["recipe"], run_dir, args, leading_args=["--model_name_or_path", grid["model"]], capture_output=True
    )
    if run.returncode != 0 or not os.path.exists(os.path.join(run_dir, "config.json")):
        raise RuntimeError(f"exit {run.returncode}: {run.stderr[-2000:]}")
    history = [h for h in load_history(run_dir) if "entropy" in h]
    return {
        "command": run.logged_command,
        "steps": len(history),
        "entropy_first": history[0]["entropy"] if history else None,
        "entropy_last": history[-1]["entropy"] if history else None,
        "seconds": round(run.seconds, 1),
    }
