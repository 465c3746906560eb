"""The units of an `intervention` experiment: the model and the cached rollouts they share, one perturbation config
measured before and after one ALP update, one Bypass curve, and Bypass interpolated at ALP's update size."""

import math
import os

import torch

from ..intervention import RolloutBatch, group_advantages, one_update, policy_logps, prepared_prompts
from ..ratio_statistics import binned_log_ratio_envelope
from .atomic_files import save_torch_atomically
from .engine_rollouts import VLLMEngines, sample_engine_rollouts
from .grid import engine_id


class InterventionContext:
    """The model (loaded once) and the cached rollouts of each (engine, seed) of an intervention experiment."""

    def __init__(self, grid: dict, out_dir: str, engines: VLLMEngines | None = None):
        self.grid, self.out_dir = grid, out_dir
        self.engines = engines or VLLMEngines()
        self.model = self.tokenizer = self.start_state = None
        self.rollouts = {}

    def load_model(self):
        if self.model is None:
            from ..model_loading import load_policy

            dtype = getattr(torch, self.grid.get("dtype", "float32"))
            self.model, self.tokenizer = load_policy(self.grid["model"], dtype)
            self.model.to(self.grid.get("device", "cpu"))
            self.start_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.model, self.tokenizer

    def cached_rollouts(self, experiment: dict, engine: dict, seed: int) -> dict:
        """Rollouts of one engine and seed (sampled once, cached on disk), the unperturbed policy's log-probs,
        advantages.

        On disk the batches are plain 5-tuples, as they always were; in memory they are `RolloutBatch`es. The
        unperturbed log-probs are stored as `"unperturbed"`; caches written before under `"clean"` load as well."""
        key = (experiment["name"], engine_id(engine), seed)
        if key in self.rollouts:
            return self.rollouts[key]
        model, tokenizer = self.load_model()
        path = os.path.join(self.out_dir, "cache", f"{key[0]}__{key[1]}__seed{seed}.pt")
        if os.path.exists(path):
            cached = torch.load(path, weights_only=False, map_location=self.grid.get("device", "cpu"))
            cached["batches"] = [RolloutBatch(*batch) for batch in cached["batches"]]
            if "clean" in cached:  # the key of caches written before the rename
                cached["unperturbed"] = cached.pop("clean")
        else:
            cached = sample_intervention_batch(
                model, tokenizer, experiment.get("data", {}), engine, seed, self.engines, self.grid["model"]
            )
            save_torch_atomically({**cached, "batches": [tuple(batch) for batch in cached["batches"]]}, path)
        self.rollouts[key] = cached
        return cached

    def restore(self):
        self.model.load_state_dict(self.start_state)
        self.model.eval()


def sample_intervention_batch(
    model, tokenizer, data: dict, engine: dict, seed: int, engines: VLLMEngines | None = None, model_path: str = ""
) -> dict:
    """The rollouts of one engine and seed (`engine_rollouts`; the real vLLM engine runs on `model_path`), their
    rewards and group advantages, and the unperturbed policy's log-probs of them."""
    prepared = prepared_prompts(tokenizer, data)
    num_generations = data.get("num_generations", 4)
    batches = sample_engine_rollouts(
        model, tokenizer, engines or VLLMEngines(), model_path, prepared["prompt"], engine, data, seed
    )
    answers = [a for a in prepared["answer"] for _ in range(num_generations)]
    rewards, advantages = group_advantages(tokenizer, batches, answers, num_generations, data.get("reward", "math"))
    unperturbed = policy_logps(model, batches, None, data.get("temperature", 1.0))
    return {
        "batches": batches,
        "advantages": advantages,
        "rewards": rewards,
        "unperturbed": unperturbed,
        "temperature": data.get("temperature", 1.0),
        "num_generations": num_generations,
    }


def log_ratio_summary(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict:
    """The envelope of a token log-ratio over the masked-in tokens: quantiles, its width p99 - p1, |log r| tail, KL."""
    values = log_ratio[mask.bool()].float()
    q = torch.quantile(values, torch.tensor([0.01, 0.05, 0.5, 0.95, 0.99], device=values.device))
    return {
        "p01": float(q[0]),
        "p05": float(q[1]),
        "p50": float(q[2]),
        "p95": float(q[3]),
        "p99": float(q[4]),
        "width_p01_p99": float(q[4] - q[0]),
        "abs_p99": float(torch.quantile(values.abs(), 0.99)),
        "kl_k3": float((values.exp() - 1 - values).mean()),
    }


def measure_update_size(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> dict:
    """The size of an update from the policy's log-probs before and after it: KL(before || after), the k3 estimate on
    the rollout tokens (samples of the rollout ~ the policy before the update), and the reverse k3."""
    return {
        "update_size_kl": log_ratio_summary(after - before, mask)["kl_k3"],
        "update_size_reverse_k3": log_ratio_summary(before - after, mask)["kl_k3"],
    }


def _update(experiment: dict) -> dict:
    """The intervention's optimizer and number of steps (`update_optimizer`, `update_steps`; default one AdamW step)."""
    return {"optimizer": experiment.get("update_optimizer", "adamw"), "steps": experiment.get("update_steps", 1)}


def _unit_rollouts(context: InterventionContext, experiment: dict, unit: dict):
    """The cached rollouts of a unit's engine and seed: (cache, batches, temperature, completion mask, rollout logps)."""
    cached = context.cached_rollouts(experiment, unit["engine"], unit["seed"])
    batches = cached["batches"]
    mask = torch.cat([b.completion_mask for b in batches])
    rollout = torch.cat([b.rollout_logps for b in batches])
    return cached, batches, cached["temperature"], mask, rollout


def run_perturbation_unit(context: InterventionContext, experiment: dict, unit: dict) -> dict:
    from ..perturbation import LayerwisePerturbation

    cached, batches, temperature, mask, rollout = _unit_rollouts(context, experiment, unit)
    model = context.model
    config = unit["config"]
    context.restore()
    perturbation = LayerwisePerturbation.attach(
        model,
        layers=config["perturb_layers"],
        sigma_init=config["perturb_sigma_init"],
        noise_scale=config["perturb_noise_scale"],
        learnable=False,
        seed=unit["seed"],
    )
    try:
        unperturbed = cached["unperturbed"]
        perturbed = policy_logps(model, batches, perturbation, temperature)
        result = {  # "unperturbed": the engine's own mismatch (the unperturbed policy against the rollout)
            "unperturbed": log_ratio_summary(unperturbed - rollout, mask),
            "perturbed": log_ratio_summary(perturbed - rollout, mask),
        }
        lr = experiment.get("update_lr", 1e-5)
        torch.manual_seed(unit["seed"])
        one_update(
            model, perturbation, batches, cached["advantages"], lr, temperature, perturbed=True, **_update(experiment)
        )
        after = policy_logps(model, batches, None, temperature)
        after_perturbed = policy_logps(model, batches, perturbation, temperature, key=50_000)
        result["alp_update"] = {
            "lr": lr,
            **_update(experiment),
            **measure_update_size(unperturbed, after, mask),
            "unperturbed_vs_rollout": log_ratio_summary(after - rollout, mask),
            "perturbed_vs_rollout": log_ratio_summary(after_perturbed - rollout, mask),
        }
        if experiment.get("binned_envelopes"):  # Figure 2: by rollout probability, with token counts
            bins = experiment.get("envelope_bins")
            result["alp_update"]["envelopes"] = {
                "perturbed_vs_rollout": binned_log_ratio_envelope(after_perturbed - rollout, rollout, mask, bins),
                "unperturbed_vs_rollout": binned_log_ratio_envelope(after - rollout, rollout, mask, bins),
            }
    finally:
        perturbation.detach()
        context.restore()
    return result


def run_bypass_unit(context: InterventionContext, experiment: dict, unit: dict) -> dict:
    """Bypass updates at several learning rates: (update size, distance to the rollout after) points."""
    cached, batches, temperature, mask, rollout = _unit_rollouts(context, experiment, unit)
    model = context.model
    unperturbed = cached["unperturbed"]
    base_lr = experiment.get("update_lr", 1e-5)
    points = []
    for multiplier in experiment.get("bypass_lr_multipliers", [0.5, 1, 2]):
        context.restore()
        torch.manual_seed(unit["seed"])
        one_update(
            model,
            None,
            batches,
            cached["advantages"],
            base_lr * multiplier,
            temperature,
            perturbed=False,
            **_update(experiment),
        )
        after = policy_logps(model, batches, None, temperature)
        point = {
            "lr": base_lr * multiplier,
            **measure_update_size(unperturbed, after, mask),
            "vs_rollout": log_ratio_summary(after - rollout, mask),
        }
        if experiment.get("binned_envelopes"):
            point["envelope"] = binned_log_ratio_envelope(
                after - rollout, rollout, mask, experiment.get("envelope_bins")
            )
        points.append(point)
    context.restore()
    result = {
        "update": _update(experiment),
        "engine_mismatch": log_ratio_summary(unperturbed - rollout, mask),
        "reward_mean": float(cached["rewards"].mean()),
        "points": points,
    }
    if experiment.get("binned_envelopes"):  # the policy before any update, against the rollout: the reference
        result["envelope_before"] = binned_log_ratio_envelope(
            unperturbed - rollout, rollout, mask, experiment.get("envelope_bins")
        )
    return result


def bypass_point_at_lr(points: list[dict], lr: float) -> dict | None:
    """The Bypass update of a curve made at learning rate `lr` (ALP's own), or `None` when the curve has none."""
    return next((p for p in points if math.isclose(p["lr"], lr, rel_tol=1e-9)), None)


def matched_bypass(
    points: list[dict], update_size: float, key: str = "kl_k3", size_key: str = "update_size_kl"
) -> float | None:
    """Bypass's distance to the rollout (`vs_rollout[key]`) at the given update size, interpolated between its measured
    points as a power law (linear in log-log: a distance proportional to the update size, as when the engine is close
    to the policy, is interpolated exactly); `None` outside their range."""
    return power_law_interpolate([(p[size_key], p["vs_rollout"][key]) for p in points], update_size)


def power_law_interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """`y` at `x` between measured `(x, y)` points, linear in log-log (points with `x <= 0` or `y <= 0` dropped);
    `None` outside their range."""
    pts = sorted((px, py) for px, py in points if px > 0 and py > 0)
    if x <= 0 or not pts or not pts[0][0] <= x <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return pts[0][1]
