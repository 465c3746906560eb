"""`alp-trl study --grid GRID.yaml --out DIR`: run a declared grid of experiments with several seeds, resumably.

A grid is a YAML file with a `model` (optionally `dtype`, e.g. `bfloat16`, and `device`, e.g. `cuda`), `seeds` and a
list of `experiments`, each of a `kind`:

- `intervention` (the paper's Figure 2 question, one step, no training run): for every `engine` (a simulated
  inference engine, `rollout_mismatch` + `rollout_mismatch_std`) and seed, rollouts are sampled once and cached; then,
  on the same checkpoint and the same rollouts, each `perturbation` (sigma, noise scale, layers; a cartesian
  `product` and/or an explicit `list`) is measured: the token log-ratio envelope training vs rollout without and with
  the noise, and after one ALP update (`update_lr`) the unperturbed policy's distance to the rollout together with
  the size of the update (KL(before || after), the k3 estimate on the rollout tokens). One Bypass update per `bypass_lr_multipliers` gives the
  same distances at several update sizes, so that ALP is compared with Bypass at a matched update size.
- `train`: the training entry point (`python -m alp_trl.train`) once per method and seed on a `recipe` with
  `overrides`; the run's `metrics.jsonl` is kept and summarised (largest train-rollout KL, fraction of spike steps,
  final and best reward).

An experiment may set its own `seeds`, replacing the grid's. Every unit of work (one perturbation config of one engine and seed, one Bypass curve, one training run) writes
`DIR/units/<id>.json` when it is done; a second invocation skips what exists, so an interruption loses at most the
unit in progress. `DIR/results.json` collects every unit, failed ones included (with their error), and
`--report PATH` writes the markdown report (tables as mean +- std over seeds, every run listed) and its plot
(`images/evidence_intervention.png` beside the report).
"""

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext

import torch

from .data import DEFAULT_PROMPT_TEMPLATE


# ---------------------------------------------------------------------------------------------------------- the grid
def load_grid(path: str) -> dict:
    """Read and validate a grid file; errors name the key."""
    import yaml

    with open(path) as f:
        grid = yaml.safe_load(f) or {}
    for key in ("model", "seeds", "experiments"):
        if key not in grid:
            raise ValueError(f"The grid {path} needs `{key}`.")
    if not isinstance(grid["seeds"], list) or not grid["seeds"]:
        raise ValueError("`seeds` must be a non-empty list of integers.")
    for index, experiment in enumerate(grid["experiments"]):
        kind = experiment.get("kind")
        if kind not in ("intervention", "train"):
            raise ValueError(
                f"`experiments[{index}].kind` got {kind!r}; allowed values are ['intervention', 'train']."
            )
        if "name" not in experiment:
            raise ValueError(f"`experiments[{index}]` needs a `name`.")
        if kind == "train" and not experiment.get("methods"):
            raise ValueError(f"`experiments[{index}].methods` must name at least one method.")
    return grid


def perturbation_configs(spec: dict) -> list[dict]:
    """The perturbation configs of an intervention: the cartesian `product` of its lists, then the explicit `list`."""
    configs = []
    product = spec.get("product") or {}
    if product:
        keys = list(product)
        for values in itertools.product(*(product[k] for k in keys)):
            configs.append(dict(zip(keys, values)))
    configs += list(spec.get("list") or [])
    for config in configs:
        config.setdefault("perturb_noise_scale", "absolute")
        config.setdefault("perturb_layers", "all")
    return configs


def _slug(value) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in str(value))


def engine_id(engine: dict) -> str:
    kind = engine.get("rollout_mismatch", "none")
    std = engine.get("rollout_mismatch_std")
    return kind if not std else f"{kind}{std:g}"


def config_id(config: dict) -> str:
    return (
        f"{config['perturb_noise_scale']}-s{config['perturb_sigma_init']:g}-{_slug(config['perturb_layers'])}".replace(
            "+", ""
        )
    )


def plan_units(grid: dict) -> list[dict]:
    """Every unit of work of a grid, in order, with a stable id (the name of its result file)."""
    units = []
    for experiment in grid["experiments"]:
        name = experiment["name"]
        for seed in experiment.get("seeds", grid["seeds"]):
            if experiment["kind"] == "intervention":
                for engine in experiment["engines"]:
                    base = f"{name}__{engine_id(engine)}__seed{seed}"
                    units.append(
                        {
                            "id": f"{base}__bypass",
                            "type": "bypass_curve",
                            "experiment": name,
                            "engine": engine,
                            "seed": seed,
                        }
                    )
                    for config in perturbation_configs(experiment["perturbations"]):
                        units.append(
                            {
                                "id": f"{base}__{config_id(config)}",
                                "type": "perturbation",
                                "experiment": name,
                                "engine": engine,
                                "seed": seed,
                                "config": config,
                            }
                        )
            else:
                if experiment.get("eval"):  # the untrained model's held-out accuracy, the reference for the runs
                    units.append(
                        {
                            "id": f"{name}__base_model__seed{seed}",
                            "type": "eval_base",
                            "experiment": name,
                            "method": BASE_MODEL,
                            "seed": seed,
                        }
                    )
                for method in experiment["methods"]:
                    units.append(
                        {
                            "id": f"{name}__{_slug(method)}__seed{seed}",
                            "type": "train",
                            "experiment": name,
                            "method": method,
                            "seed": seed,
                        }
                    )
    return units


BASE_MODEL = "base model (not trained)"


# ------------------------------------------------------------------------------------------- intervention units
class InterventionContext:
    """The model (loaded once) and the cached rollouts of each (engine, seed) of an intervention experiment."""

    def __init__(self, grid: dict, out_dir: str):
        self.grid, self.out_dir = grid, out_dir
        self.model = self.tokenizer = self.clean_state = None
        self.rollouts = {}

    def load_model(self):
        if self.model is None:
            from .models import load_policy

            dtype = getattr(torch, self.grid.get("dtype", "float32"))
            self.model, self.tokenizer = load_policy(self.grid["model"], dtype)
            self.model.to(self.grid.get("device", "cpu"))
            self.clean_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.model, self.tokenizer

    def batch(self, experiment: dict, engine: dict, seed: int) -> dict:
        """Rollouts of one engine and seed (sampled once, cached on disk), the clean policy's log-probs, advantages."""
        key = (experiment["name"], engine_id(engine), seed)
        if key in self.rollouts:
            return self.rollouts[key]
        model, tokenizer = self.load_model()
        path = os.path.join(self.out_dir, "cache", f"{key[0]}__{key[1]}__seed{seed}.pt")
        if os.path.exists(path):
            cached = torch.load(path, weights_only=False, map_location=self.grid.get("device", "cpu"))
        else:
            cached = sample_intervention_batch(model, tokenizer, experiment.get("data", {}), engine, seed)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(cached, path)
        self.rollouts[key] = cached
        return cached

    def restore(self):
        self.model.load_state_dict(self.clean_state)
        self.model.eval()


def sample_intervention_batch(model, tokenizer, data: dict, engine: dict, seed: int) -> dict:
    from .data import build_prompts, load_split
    from .intervention import group_advantages, pad_batches, sample_rollouts

    raw = load_split(data.get("dataset", "builtin:arithmetic"), split=data.get("split", "test"))
    raw = raw.select(range(min(data.get("num_prompts", 8), len(raw))))
    prepared = build_prompts(
        raw,
        data.get("problem_column", "problem"),
        data.get("answer_column", "answer"),
        data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE),
        conversational=tokenizer.chat_template is not None,
    )
    num_generations = data.get("num_generations", 4)
    torch.manual_seed(seed)
    batches = pad_batches(
        sample_rollouts(
            model,
            tokenizer,
            prepared["prompt"],
            num_generations,
            data.get("max_new_tokens", 32),
            data.get("temperature", 1.0),
            engine.get("rollout_mismatch", "none"),
            engine.get("rollout_mismatch_std", 0.0),
            seed,
            data.get("batch_size", 16),
        )
    )
    answers = [a for a in prepared["answer"] for _ in range(num_generations)]
    rewards, advantages = group_advantages(tokenizer, batches, answers, num_generations, data.get("reward", "math"))
    clean = policy_logps(model, batches, None, data.get("temperature", 1.0))
    return {
        "batches": batches,
        "advantages": advantages,
        "rewards": rewards,
        "clean": clean,
        "temperature": data.get("temperature", 1.0),
        "num_generations": num_generations,
    }


@torch.no_grad()
def policy_logps(model, batches, perturbation, temperature: float, key: int = 0) -> torch.Tensor:
    from .intervention import completion_logps

    parts = []
    for step, (prompt_ids, prompt_mask, completion, completion_mask, _) in enumerate(batches):
        with perturbation.active(step=key + step) if perturbation is not None else nullcontext():
            parts.append(completion_logps(model, prompt_ids, prompt_mask, completion, completion_mask, temperature))
    return torch.cat(parts)


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


def _unit_batch(context: InterventionContext, experiment: dict, unit: dict):
    """The cached rollouts of a unit's engine and seed: (cache, batches, temperature, completion mask, rollout logps)."""
    cached = context.batch(experiment, unit["engine"], unit["seed"])
    batches = cached["batches"]
    mask = torch.cat([b[3] for b in batches])
    rollout = torch.cat([b[4] for b in batches])
    return cached, batches, cached["temperature"], mask, rollout


def run_perturbation_unit(context: InterventionContext, experiment: dict, unit: dict) -> dict:
    from .intervention import one_update
    from .perturbation import LayerwisePerturbation

    cached, batches, temperature, mask, rollout = _unit_batch(context, experiment, unit)
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
        clean = cached["clean"]
        perturbed = policy_logps(model, batches, perturbation, temperature)
        result = {  # "unperturbed" is also the engine's own mismatch to the clean policy
            "unperturbed": log_ratio_summary(clean - rollout, mask),
            "perturbed": log_ratio_summary(perturbed - rollout, mask),
        }
        lr = experiment.get("update_lr", 1e-5)
        torch.manual_seed(unit["seed"])
        one_update(model, perturbation, batches, cached["advantages"], lr, temperature, perturbed=True)
        after = policy_logps(model, batches, None, temperature)
        after_perturbed = policy_logps(model, batches, perturbation, temperature, key=50_000)
        result["alp_update"] = {
            "lr": lr,
            # KL(before || after), k3 on the rollout tokens (samples of the rollout ~ the policy before the update)
            "update_size_kl": log_ratio_summary(after - clean, mask)["kl_k3"],
            "update_size_reverse_k3": log_ratio_summary(clean - after, mask)["kl_k3"],
            "unperturbed_vs_rollout": log_ratio_summary(after - rollout, mask),
            "perturbed_vs_rollout": log_ratio_summary(after_perturbed - rollout, mask),
        }
    finally:
        perturbation.detach()
        context.restore()
    return result


def run_bypass_unit(context: InterventionContext, experiment: dict, unit: dict) -> dict:
    """Bypass updates at several learning rates: (update size, distance to the rollout after) points."""
    from .intervention import one_update

    cached, batches, temperature, mask, rollout = _unit_batch(context, experiment, unit)
    model = context.model
    clean = cached["clean"]
    base_lr = experiment.get("update_lr", 1e-5)
    points = []
    for multiplier in experiment.get("bypass_lr_multipliers", [0.5, 1, 2]):
        context.restore()
        torch.manual_seed(unit["seed"])
        one_update(model, None, batches, cached["advantages"], base_lr * multiplier, temperature, perturbed=False)
        after = policy_logps(model, batches, None, temperature)
        points.append(
            {
                "lr": base_lr * multiplier,
                # KL(before || after), k3 on the rollout tokens (samples of the rollout ~ the policy before the update)
                "update_size_kl": log_ratio_summary(after - clean, mask)["kl_k3"],
                "update_size_reverse_k3": log_ratio_summary(clean - after, mask)["kl_k3"],
                "vs_rollout": log_ratio_summary(after - rollout, mask),
            }
        )
    context.restore()
    return {
        "engine_mismatch": log_ratio_summary(clean - rollout, mask),
        "reward_mean": float(cached["rewards"].mean()),
        "points": points,
    }


def matched_bypass(points: list[dict], update_size: float, key: str = "kl_k3") -> float | None:
    """Bypass's distance to the rollout (`vs_rollout[key]`) at the given update size, interpolated between its measured
    points as a power law (linear in log-log: a distance proportional to the update size, as when the engine is close
    to the policy, is interpolated exactly); `None` outside their range."""
    pts = sorted(
        (p["update_size_kl"], p["vs_rollout"][key])
        for p in points
        if p["update_size_kl"] > 0 and p["vs_rollout"][key] > 0
    )
    if update_size <= 0 or not pts or not pts[0][0] <= update_size <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= update_size <= x1:
            if x1 == x0:
                return y0
            t = (math.log(update_size) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return pts[0][1]


# ---------------------------------------------------------------------------------------------------- train units
def run_train_unit(grid: dict, experiment: dict, unit: dict, out_dir: str) -> dict:
    from .plots import load_history

    run_dir = os.path.join(out_dir, "train", unit["id"])
    overrides = {**experiment.get("overrides", {}), **experiment["methods"][unit["method"]]}
    command = [sys.executable, "-m", "alp_trl.train", "--config", experiment["recipe"]]
    command += ["--model_name_or_path", grid["model"], "--output_dir", run_dir, "--seed", str(unit["seed"])]
    command += ["--auto_resume", "false", "--plot", "false", "--save_strategy", "no"]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        os.remove(os.path.join(run_dir, "metrics.jsonl"))
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    history = load_history(run_dir)
    summary = summarize_training(history, experiment)
    if experiment.get("eval"):  # held-out accuracy of the trained model, with the evaluation the users run
        summary["eval_avg_at_k"] = run_eval(run_dir, os.path.join(run_dir, "eval"), unit["seed"], experiment["eval"])
    return {"command": " ".join(command[2:]), "summary": summary, "history": history}


def run_eval(model: str, eval_dir: str, seed: int, evaluation: dict) -> float:
    """`alp-trl eval` of `model` with the experiment's `eval` settings; returns the overall avg@k."""
    command = [sys.executable, "-m", "alp_trl.evaluate", model, "--out", eval_dir, "--seed", str(seed)]
    command += ["--benchmarks", *evaluation.get("benchmarks", ["arithmetic"])]
    for key in ("k", "limit", "max_new_tokens", "temperature"):
        if key in evaluation:
            command += [f"--{key.replace('_', '-')}", str(evaluation[key])]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation failed, exit {proc.returncode}: {proc.stderr[-2000:]}")
    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        results = json.load(f)["results"]
    overall = results.get("overall", next(iter(results.values())))
    return next(v for k, v in overall.items() if k.startswith("avg@"))


def run_base_eval_unit(grid: dict, experiment: dict, unit: dict, out_dir: str) -> dict:
    eval_dir = os.path.join(out_dir, "train", unit["id"], "eval")
    return {"summary": {"eval_avg_at_k": run_eval(grid["model"], eval_dir, unit["seed"], experiment["eval"])}}


def summarize_training(history: list[dict], experiment: dict) -> dict:
    """The stress measures of one training run: largest train-rollout KL and grad norm, the fraction of spike steps
    (KL above `spike_kl` or grad norm above `spike_grad_norm`), final and best reward."""

    def series(key):
        return [r[key] for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    kl, grad, reward = series("alp/train_rollout_kl"), series("grad_norm"), series("reward")
    entropy = series("entropy")
    if not kl:
        kl = series("rollout_mismatch/kl_k3")
    spike_kl, spike_grad = experiment.get("spike_kl", 0.05), experiment.get("spike_grad_norm", 10.0)
    steps = [r for r in history if "grad_norm" in r]
    spikes = [
        r
        for r in steps
        if (r.get("alp/train_rollout_kl") or 0) > spike_kl
        or not math.isfinite(r.get("grad_norm", 0))
        or r.get("grad_norm", 0) > spike_grad
    ]
    tail = reward[len(reward) // 2 :] if reward else []
    return {
        "steps": len(steps),
        "max_train_rollout_kl": max(kl) if kl else None,
        "max_grad_norm": max(grad) if grad else None,
        "spike_frac": len(spikes) / len(steps) if steps else None,
        "final_reward": reward[-1] if reward else None,
        "best_reward": max(reward) if reward else None,
        "late_reward": sum(tail) / len(tail) if tail else None,
        "min_entropy": min(entropy) if entropy else None,
        "final_entropy": entropy[-1] if entropy else None,
        "nonfinite_steps": (steps[-1].get("train/nonfinite_steps") if steps else None),
    }


def training_summaries(records: list[dict], experiments: dict) -> dict:
    """Each training record's summary, recomputed from its stored history with the grid's current spike thresholds
    (the held-out accuracy is kept from the run); keyed by `id(record)`."""
    summaries = {}
    for record in records:
        result = record.get("result") or {}
        summary = dict(result.get("summary", {}))
        experiment = experiments.get(record["unit"]["experiment"])
        if result.get("history") and experiment is not None:
            summary.update(summarize_training(result["history"], experiment))
        summaries[id(record)] = summary
    return summaries


TRAINING_PANELS = (
    ("reward", "reward"),
    ("alp/train_rollout_kl", "train-rollout KL (k3)"),
    ("grad_norm", "grad norm"),
    ("entropy", "entropy"),
)


def plot_training(records: list[dict], path: str) -> bool:
    """One panel per measure, one colour per method: every seed as a thin line, the mean over seeds thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import _series

    runs = [r for r in records if r.get("status") == "ok" and (r.get("result") or {}).get("history")]
    if not runs:
        return False
    methods = list(dict.fromkeys(r["unit"]["method"] for r in runs))
    fig, axes = plt.subplots(
        1, len(TRAINING_PANELS), figsize=(4.5 * len(TRAINING_PANELS), 3.8), constrained_layout=True
    )
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(methods):
        color = colors(index % 10)
        histories = [r["result"]["history"] for r in runs if r["unit"]["method"] == method]
        for ax, (key, title) in zip(axes, TRAINING_PANELS):
            curves = [dict(zip(*_series(history, key))) for history in histories]
            for curve in curves:
                ax.plot(list(curve), list(curve.values()), color=color, lw=0.6, alpha=0.35)
            steps = sorted(set().union(*curves))
            means = [statistics.mean(c[step] for c in curves if step in c) for step in steps]
            ax.plot(steps, means, color=color, lw=2, label=method if ax is axes[0] else None)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------ driver
def run_study(grid_path: str, out_dir: str, only: list[str] | None = None) -> dict:
    """Run every unit not yet done (each result written as it lands), then collect `results.json`."""
    from tqdm.auto import tqdm

    grid = load_grid(grid_path)
    units = plan_units(grid)
    if only:
        units = [u for u in units if u["experiment"] in only]
    experiments = {e["name"]: e for e in grid["experiments"]}
    runs_dir = os.path.join(out_dir, "units")
    os.makedirs(runs_dir, exist_ok=True)
    context = InterventionContext(grid, out_dir)
    todo = [u for u in units if not os.path.exists(os.path.join(runs_dir, f"{u['id']}.json"))]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="study", unit="run")
    for unit in todo:
        bar.set_postfix_str(unit["id"][-60:])
        start = time.time()
        record = {"unit": unit, "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            experiment = experiments[unit["experiment"]]
            if unit["type"] == "perturbation":
                record["result"] = run_perturbation_unit(context, experiment, unit)
            elif unit["type"] == "bypass_curve":
                record["result"] = run_bypass_unit(context, experiment, unit)
            elif unit["type"] == "eval_base":
                record["result"] = run_base_eval_unit(grid, experiment, unit, out_dir)
            else:
                record["result"] = run_train_unit(grid, experiment, unit, out_dir)
            record["status"] = "ok"
        except Exception as error:  # a failed run is recorded and shown, never dropped
            record["status"] = "failed"
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc()[-3000:]
        record["seconds"] = round(time.time() - start, 1)
        path = os.path.join(runs_dir, f"{unit['id']}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)  # atomic: an interrupted write never leaves a half file
        bar.update(1)
    bar.close()
    return collect(grid, grid_path, out_dir, units)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} ({cpu}, {os.cpu_count()} cores, {gpu}), torch {torch.__version__}"


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
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)
    return results


# ------------------------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def intervention_rows(records: list[dict]) -> list[dict]:
    """One row per (experiment, engine, perturbation config): the seeds' values side by side."""
    bypass = {
        (r["unit"]["experiment"], engine_id(r["unit"]["engine"]), r["unit"]["seed"]): r["result"]["points"]
        for r in records
        if r["unit"]["type"] == "bypass_curve" and r.get("status") == "ok"
    }
    rows = {}
    for record in records:
        unit = record["unit"]
        if unit["type"] != "perturbation":
            continue
        key = (unit["experiment"], engine_id(unit["engine"]), config_id(unit["config"]))
        row = rows.setdefault(key, {"key": key, "config": unit["config"], "seeds": [], "failed": [], "pending": []})
        if record.get("status") == "failed":
            row["failed"].append(unit["seed"])
        if record.get("status") != "ok":
            if record.get("status") != "failed":
                row["pending"].append(unit["seed"])
            continue
        res = record["result"]
        alp = res["alp_update"]
        points = bypass.get((unit["experiment"], engine_id(unit["engine"]), unit["seed"]), [])
        row["seeds"].append(
            {
                "seed": unit["seed"],
                "engine_kl": res["unperturbed"]["kl_k3"],
                "width_unperturbed": res["unperturbed"]["width_p01_p99"],
                "width_perturbed": res["perturbed"]["width_p01_p99"],
                "width_ratio": res["perturbed"]["width_p01_p99"] / max(res["unperturbed"]["width_p01_p99"], 1e-12),
                "kl_perturbed": res["perturbed"]["kl_k3"],
                "alp_update_size": alp["update_size_kl"],
                "alp_after_kl": alp["unperturbed_vs_rollout"]["kl_k3"],
                "bypass_matched_kl": matched_bypass(points, alp["update_size_kl"]),
            }
        )
    return list(rows.values())


def plot_intervention(rows: list[dict], path: str) -> bool:
    """Per engine: the perturbed / unperturbed envelope width ratio vs sigma (all layers, per noise scale), and the KL
    to the rollout after one ALP update vs Bypass at the matched update size. Returns whether anything was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({row["key"][1] for row in rows if row["seeds"]})
    if not engines:
        return False
    fig, axes = plt.subplots(2, len(engines), figsize=(6 * len(engines), 8), squeeze=False, constrained_layout=True)
    for column, engine in enumerate(engines):
        for scale, color in (("absolute", "tab:blue"), ("rms", "tab:orange")):
            points = sorted(
                (row["config"]["perturb_sigma_init"], row["seeds"])
                for row in rows
                if row["key"][1] == engine
                and row["seeds"]
                and row["config"]["perturb_layers"] == "all"
                and row["config"]["perturb_noise_scale"] == scale
            )
            if not points:
                continue
            sigmas = [p[0] for p in points]
            for ax, key, style in ((axes[0][column], "width_ratio", "-"), (axes[1][column], "alp_after_kl", "-")):
                means = [statistics.mean(s[key] for s in seeds) for _, seeds in points]
                ax.plot(sigmas, means, style, marker="o", color=color, label=f"{scale}: ALP")
            matched = [
                [s["bypass_matched_kl"] for s in seeds if s["bypass_matched_kl"] is not None] for _, seeds in points
            ]
            xs = [x for x, m in zip(sigmas, matched) if m]
            if xs:
                axes[1][column].plot(
                    xs,
                    [statistics.mean(m) for m in matched if m],
                    "--",
                    marker="x",
                    color=color,
                    label=f"{scale}: Bypass, matched update size",
                )
        axes[0][column].axhline(1.0, color="k", lw=0.8)
        axes[0][column].set_title(f"{engine}: envelope width, perturbed / unperturbed")
        axes[1][column].set_title(f"{engine}: KL to the rollout after one update")
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xscale("log")
            ax.set_xlabel("sigma")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _own_seeds(grid: dict) -> str:
    own = [f"{e['name']}: {e['seeds']}" for e in grid["experiments"] if "seeds" in e]
    return f" ({'; '.join(own)})" if own else ""


def write_report(results: dict, path: str, command: str) -> None:
    """The markdown report: setup, every intervention row (mean ± std over seeds), every training run."""
    records = results["records"]
    grid = results["grid"]
    done = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") == "failed"]
    missing = [r for r in records if r.get("status") == "not run"]
    machines = sorted({r.get("machine", "?") for r in done})
    seconds = sum(r.get("seconds", 0) for r in records)
    lines = [
        "# Evidence: what ALP does on this repository's models",
        "",
        f"Reproduce: `{command}` (resumable; `make study`). Grid: `{results['grid_path']}`, model "
        f"`{grid['model']}`, seeds {grid['seeds']}{_own_seeds(grid)}. Machine(s): {'; '.join(machines) or 'n/a'}. "
        f"Units: {len(done)} done, {len(failed)} failed, {len(missing)} not run yet; {seconds / 60:.1f} min of "
        "compute in the finished units.",
        "",
    ]
    if grid.get("conclusion"):  # written by hand in the grid file, from the tables below, and dated there
        lines += ["## Conclusion", "", grid["conclusion"].strip(), ""]
    image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    rows = intervention_rows(records)
    if rows:
        os.makedirs(image_dir, exist_ok=True)
        drawn = plot_intervention(rows, os.path.join(image_dir, "evidence_intervention.png"))
        lines += [
            "## One-step intervention",
            "",
            *(["![intervention](images/evidence_intervention.png)", ""] if drawn else []),
            "Per engine and perturbation (mean ± std over seeds): the width p99 - p1 of the token log-ratio training vs "
            "rollout without noise and with it (ratio < 1: the perturbed envelope is narrower), the perturbed ratio's "
            "KL to the rollout, and after one ALP update the unperturbed policy's KL to the rollout beside Bypass's "
            "at the same update size (KL before -> after; interpolated as a power law between Bypass updates at "
            "several learning rates; n/a when ALP's update size is outside their range).",
            "",
            "| engine | noise | sigma | layers | seeds | engine KL | width clean | width perturbed | ratio | "
            "KL perturbed | ALP update size | ALP after: KL to rollout | Bypass, matched size |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            seeds = row["seeds"]
            config = row["config"]

            def col(name, seeds=seeds):
                return mean_std([s[name] for s in seeds])

            label = f"{len(seeds)}" + (f" (failed: {row['failed']})" if row["failed"] else "")
            label += f" (not run yet: {row['pending']})" if row["pending"] else ""
            lines.append(
                f"| {row['key'][1]} | {config['perturb_noise_scale']} | {config['perturb_sigma_init']:g} | "
                f"{config['perturb_layers']} | {label} | {col('engine_kl')} | {col('width_unperturbed')} | "
                f"{col('width_perturbed')} | {col('width_ratio')} | {col('kl_perturbed')} | "
                f"{col('alp_update_size')} | {col('alp_after_kl')} | {col('bypass_matched_kl')} |"
            )
        lines.append("")
    train = [r for r in records if r["unit"]["type"] in ("train", "eval_base")]
    if train:
        experiments = {e["name"]: e for e in grid["experiments"]}
        summaries = training_summaries(train, experiments)
        os.makedirs(image_dir, exist_ok=True)
        lines += ["## Training runs", ""]
        for name, experiment in experiments.items():
            runs = [r for r in train if r["unit"]["experiment"] == name]
            if not runs:
                continue
            drawn = plot_training(runs, os.path.join(image_dir, f"evidence_{_slug(name)}.png"))
            lines += [
                f"### {name}",
                "",
                *([f"![{name}](images/evidence_{_slug(name)}.png)", ""] if drawn else []),
                f"Per method, mean ± std over the seeds that finished. A spike is a step whose train-rollout KL "
                f"exceeds {experiment.get('spike_kl', 0.05):g} or whose grad norm exceeds "
                f"{experiment.get('spike_grad_norm', 10.0):g} (or is not finite). Under ALP the train side of the "
                "train-rollout KL is the perturbed policy; under Token-/Seq-MIS (rejection by dropping) the KL and the entropy "
                "are over the tokens the rejection keeps. Late reward: the mean over the second half of the steps.",
                "",
                "| method | seeds ok | failed | max train-rollout KL | max grad norm | spike frac | final reward | "
                "late reward | best reward | min entropy | final entropy | held-out avg@k |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            has_base = any(r["unit"]["type"] == "eval_base" for r in runs)
            for method in [BASE_MODEL, *experiment["methods"]] if has_base else experiment["methods"]:
                ok = [summaries[id(r)] for r in runs if r["unit"]["method"] == method and r.get("status") == "ok"]
                bad = [
                    r["unit"]["seed"] for r in runs if r["unit"]["method"] == method and r.get("status") == "failed"
                ]

                def agg(key, ok=ok):
                    return mean_std([s.get(key) for s in ok])

                lines.append(
                    f"| {method} | {len(ok)} | {bad or ''} | {agg('max_train_rollout_kl')} | {agg('max_grad_norm')} | "
                    f"{agg('spike_frac')} | {agg('final_reward')} | {agg('late_reward')} | {agg('best_reward')} | "
                    f"{agg('min_entropy')} | {agg('final_entropy')} | {agg('eval_avg_at_k')} |"
                )
            lines.append("")
        lines += [
            "Every run:",
            "",
            "| experiment | method | seed | status | steps | max train-rollout KL | max grad norm | spike frac | "
            "final reward | best reward | held-out avg@k | seconds |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for record in train:
            unit, summary = record["unit"], summaries[id(record)]

            def cell(key, summary=summary):
                value = summary.get(key)
                return "n/a" if value is None else f"{value:.4g}"

            lines.append(
                f"| {unit['experiment']} | {unit['method']} | {unit['seed']} | {record.get('status')} | "
                f"{cell('steps')} | {cell('max_train_rollout_kl')} | {cell('max_grad_norm')} | {cell('spike_frac')} | "
                f"{cell('final_reward')} | {cell('best_reward')} | {cell('eval_avg_at_k')} | "
                f"{record.get('seconds', 'n/a')} |"
            )
        lines.append("")
    if failed:
        lines += ["## Failed units", ""] + [f"- `{r['unit']['id']}`: {r.get('error')}" for r in failed] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="alp-trl study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=None, help="only these experiments of the grid")
    parser.add_argument("--report", default=None, help="write the markdown report here (e.g. docs/evidence.md)")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: collect the finished units and write the report"
    )
    args = parser.parse_args(argv)
    try:
        load_grid(args.grid)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.report_only:
        grid = load_grid(args.grid)
        units = plan_units(grid)
        if args.only:
            units = [u for u in units if u["experiment"] in args.only]
        results = collect(grid, args.grid, args.out, units)
    else:
        results = run_study(args.grid, args.out, args.only)
    if args.report:
        command = f"alp-trl study --grid {args.grid} --out {args.out} --report {args.report}"
        write_report(results, args.report, command)
        print(f"wrote {args.report}")
    return results


if __name__ == "__main__":
    main()
