"""The units of a `coverage` experiment: the marginal-coverage test (`alp_trl.marginal_coverage`) per checkpoint,
engine and seed, and the training of a checkpoint the experiment measures (e.g. a sharpened policy).

An engine is a simulated one (`rollout_mismatch` + `rollout_mismatch_std`: transformers generation from a modified
copy of the policy) or the real vLLM engine (`engine: vllm`, with `dtype`), whose own sampled-token log-probs are the
rollout log-probs. Rollouts are cached in `DIR/cache/<unit id>.pt` and kept, so the tables can be recomputed; an
engine's scale (the sigma whose single draw is as far from the policy as the engine, `matched_sigma`) is computed once
per checkpoint and engine, from the first seed's rollouts, and cached beside them.
"""

import json
import os

import torch

from ..intervention import RolloutBatch, pad_batches, policy_logps, prepared_prompts, sample_rollouts
from ..marginal_coverage import coverage, joint, kl_to_inference, matched_sigma
from .grid import engine_coverage_id


BASE_CHECKPOINT = "base"


class CoverageContext:
    """The model of the checkpoint being measured (one at a time) and the vLLM engine of it, loaded when needed."""

    def __init__(self, grid: dict, out_dir: str):
        self.grid, self.out_dir = grid, out_dir
        self._model_path = self._model = self._tokenizer = None
        self._llm_key = self._llm = None

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

    def vllm(self, path: str, dtype: str, seed: int):
        """A vLLM engine on `path` (in this process, eager on a CPU), reused across seeds of the same checkpoint."""
        from ..model_loading import resolve_model_path

        key = (path, dtype)
        if self._llm_key != key:
            self._llm = None
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm import LLM

            options = {} if torch.cuda.is_available() else {"enforce_eager": True}
            self._llm = LLM(
                model=resolve_model_path(path),
                dtype=dtype,
                seed=seed,
                max_model_len=1024,
                logprobs_mode="processed_logprobs",
                **options,
            )
            self._llm_key = key
        return self._llm


def prompts_of(tokenizer, data: dict) -> list:
    """The experiment's prompts (chat messages for a chat model), from its `data` settings."""
    return prepared_prompts(tokenizer, data)["prompt"]


def sample_vllm_rollouts(
    llm, tokenizer, prompts: list, num_generations: int, max_new_tokens: int, temperature: float, seed: int, size: int
) -> list[RolloutBatch]:
    """Rollouts sampled by a vLLM engine (untruncated), with the engine's own log-probs of the sampled tokens, as
    `RolloutBatch`es of `size` sequences (prompts left-padded, completions right-padded) for the trainer's forward."""
    from vllm import SamplingParams

    ids = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if not isinstance(p, str)
        else tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    # vLLM seeds the j-th of n samples with `seed + j`: disjoint seed ranges per prompt and per unit seed, so that no
    # two prompts or unit seeds share a random stream
    params = [
        SamplingParams(
            n=num_generations,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=max_new_tokens,
            logprobs=0,
            seed=(seed * len(ids) + index) * num_generations,
        )
        for index in range(len(ids))
    ]
    outputs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
    rows = []
    for prompt_ids, request in zip(ids, outputs):
        for completion in request.outputs:
            tokens = list(completion.token_ids)
            logps = [lp[token].logprob for token, lp in zip(tokens, completion.logprobs)]
            rows.append((prompt_ids, tokens, logps))
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        prompt_width = max(len(r[0]) for r in chunk)
        width = max(max(len(r[1]) for r in chunk), 1)
        prompt = torch.full((len(chunk), prompt_width), pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt)
        completion = torch.full((len(chunk), width), pad, dtype=torch.long)
        completion_mask = torch.zeros_like(completion)
        rollout = torch.zeros(completion.shape)
        for row, (p, c, lp) in enumerate(chunk):
            prompt[row, prompt_width - len(p) :] = torch.tensor(p)
            prompt_mask[row, prompt_width - len(p) :] = 1
            completion[row, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[row, : len(c)] = 1
            rollout[row, : len(lp)] = torch.tensor(lp)
        batches.append(RolloutBatch(prompt, prompt_mask, completion, completion_mask, rollout))
    return pad_batches(batches)


def unit_rollouts(context: CoverageContext, experiment: dict, unit: dict) -> list[RolloutBatch]:
    """The unit's rollouts from its engine: sampled once, then read from `DIR/cache/<unit id>.pt`."""
    path = os.path.join(context.out_dir, "cache", f"{unit['id']}.pt")
    if os.path.exists(path):
        return [RolloutBatch(*batch) for batch in torch.load(path, weights_only=False)["batches"]]
    data, engine, seed = experiment.get("data", {}), unit["engine"], unit["seed"]
    model_path = context.checkpoint_path(experiment, unit["checkpoint"])
    model, tokenizer = context.model(model_path)
    prompts = prompts_of(tokenizer, data)
    generations, max_new_tokens = data.get("num_generations", 4), data.get("max_new_tokens", 32)
    temperature, size = data.get("temperature", 1.0), data.get("batch_size", 16)
    torch.manual_seed(seed)
    if engine.get("engine") == "vllm":
        llm = context.vllm(model_path, engine.get("dtype", "bfloat16"), seed)
        batches = sample_vllm_rollouts(llm, tokenizer, prompts, generations, max_new_tokens, temperature, seed, size)
    else:
        batches = pad_batches(
            sample_rollouts(
                model,
                tokenizer,
                prompts,
                generations,
                max_new_tokens,
                temperature,
                engine.get("rollout_mismatch", "none"),
                engine.get("rollout_mismatch_std", 0.0),
                seed,
                size,
            )
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"batches": [tuple(b) for b in batches], "engine": engine, "seed": seed}, path)
    return batches


def engine_scale(context: CoverageContext, experiment: dict, unit: dict, model, batches) -> dict:
    """The engine's scale in sigma units, absolute and rms (`matched_sigma` against the engine's KL to the policy),
    from this checkpoint and engine's first measured rollouts; cached."""
    from ..perturbation import LayerwisePerturbation

    name = f"{experiment['name']}__{unit['checkpoint']}__{engine_coverage_id(unit['engine'])}__scale.json"
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
    with open(path, "w") as f:
        json.dump(scale, f)
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
