"""The units of a `train` experiment: one training run of the entry point per method and seed, the held-out
evaluation of it and of the untrained model, and the stress measures summarised from a run's metrics."""

import json
import math
import os
import subprocess
import sys

from ..train_launch import launch_training_run
from .grid import declares_blowup


def run_train_unit(grid: dict, experiment: dict, unit: dict, out_dir: str) -> dict:
    from ..plots import load_history

    run_dir = os.path.join(out_dir, "train", unit["id"])
    overrides = {**experiment.get("overrides", {}), **experiment["methods"][unit["method"]]}
    args = ["--seed", str(unit["seed"]), "--auto_resume", "false", "--plot", "false", "--save_strategy", "no"]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    run = launch_training_run(
        experiment["recipe"],
        run_dir,
        args,
        leading_args=["--model_name_or_path", grid["model"]],
        capture_output=True,
    )
    if run.returncode != 0:
        raise RuntimeError(f"exit {run.returncode}: {run.stderr[-2000:]}")
    history = load_history(run_dir)
    summary = summarize_training(history, experiment)
    if experiment.get("eval"):  # held-out accuracy of the trained model, with the evaluation the users run
        summary["eval_avg_at_k"] = run_eval(run_dir, os.path.join(run_dir, "eval"), unit["seed"], experiment["eval"])
    return {"command": run.logged_command, "summary": summary, "history": history}


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
    shares = _shares_of_limits(history, experiment)  # once: the blow-up steps and the peak both read them
    blown = _steps_over(shares)
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
        "late_spike_steps": sum(1 for r in spikes if r in steps[len(steps) // 2 :]) if steps else None,
        "blowup_step": blown[0] if blown else None,  # the primary endpoint of a blow-up comparison
        "blowup_step_count": len(blown),
        "blowup_peak": _peak(shares),
        "blowup_positions": batch_positions(blown, updates_per_generation(experiment)),
        "blowup_declared": declares_blowup(experiment),
        **ratio_trend(history),
    }


def blowup_steps(history: list[dict], experiment: dict) -> list:
    """Every step where the policy's own ratio to the rollout blew up: its train-rollout KL above the experiment's
    `blowup_kl` or its largest |log ratio| above `blowup_log_ratio`, or either not finite; under ALP the unperturbed
    policy's (`log_unperturbed_ratio`) where logged, so that the noise draw itself is not counted; under a MIS
    rejection that drops tokens, over every scored token (`alp/all_tokens_*`) where logged, so that the tokens the
    rejection removed still count. Empty when no step did, or the experiment declares neither threshold (a blow-up is
    relative to the engine's own mismatch)."""
    return _steps_over(_shares_of_limits(history, experiment))


def blowup_peak(history: list[dict], experiment: dict) -> float | None:
    """How near the run came to the blow-up limits, or how far over: the largest, over its steps, of the policy's own
    train-rollout KL over `blowup_kl` and its largest |log ratio| over `blowup_log_ratio` (the statistics
    `blowup_steps` judges; inf where one was not finite). Above 1 exactly when the run blew up; the limits scaled by
    `c` would count it as blown up exactly when this is above `c`. `None` without declared limits or logged ratios."""
    return _peak(_shares_of_limits(history, experiment))


def _steps_over(shares: list[tuple]) -> list:
    """The steps of `_shares_of_limits` over a limit."""
    return [step for step, share in shares if share > 1.0]


def _peak(shares: list[tuple]) -> float | None:
    """The largest share of `_shares_of_limits`, `None` when there is none."""
    return max((share for _, share in shares), default=None)


def _shares_of_limits(history: list[dict], experiment: dict) -> list[tuple]:
    """`(step, share)` for each step that logged the policy's own ratio: the larger of its statistics over their
    limits (inf where one was not finite, declared limit or not). Empty when the experiment declares no limit."""
    if not declares_blowup(experiment):
        return []
    kl_key, tail_key = own_ratio_keys(history)
    # an undeclared limit is infinite: only a value that is not finite reaches it
    limits = [
        (kl_key, experiment.get("blowup_kl", math.inf)),
        (tail_key, experiment.get("blowup_log_ratio", math.inf)),
    ]
    shares = []
    for record in history:
        values = [(record[key], limit) for key, limit in limits if isinstance(record.get(key), (int, float))]
        if values:
            shares.append(
                (record.get("step"), max(v / limit if math.isfinite(v) else math.inf for v, limit in values))
            )
    return shares


def updates_per_generation(experiment: dict) -> int | None:
    """How many optimizer steps train on one generation batch, from the experiment's `overrides`: TRL samples anew
    every `steps_per_generation * num_iterations` micro-steps, `gradient_accumulation_steps` to an optimizer step.
    `None` when the experiment does not set `steps_per_generation` (TRL's default is one batch per step)."""
    overrides = experiment.get("overrides", {})
    if "steps_per_generation" not in overrides:
        return None
    micro_steps = overrides["steps_per_generation"] * overrides.get("num_iterations", 1)
    return max(1, micro_steps // overrides.get("gradient_accumulation_steps", 1))


def batch_positions(steps: list, updates: int | None) -> list[int] | None:
    """How many of `steps` were the 1st, 2nd, ..., `updates`-th optimizer step on their generation batch (step 1 is
    the first on the first batch). At the 1st the policy is the one that sampled, so only the engine's own mismatch
    separates them; at the k-th it has moved k - 1 updates since. `None` with one update per batch or unknown."""
    if not updates or updates < 2:
        return None
    counts = [0] * updates
    for step in steps:
        counts[(int(step) - 1) % updates] += 1
    return counts


# Where a run logged them (`alp/<name>_train_rollout_kl`, ...), the statistics of the policy's own ratio over every
# scored token: ALP's unperturbed policy (`log_unperturbed_ratio`), a MIS rejection's tokens before it dropped any.
OWN_RATIO_SERIES = ("unperturbed", "all_tokens")


def own_ratio_keys(history: list[dict]) -> tuple[str, str]:
    """The logged metrics of the policy's own ratio to the rollout over every scored token, `(train-rollout KL,
    largest |log ratio|)`: the first of `OWN_RATIO_SERIES` the run logged, else the update's own statistics."""
    own = next((n for n in OWN_RATIO_SERIES if any(f"alp/{n}_train_rollout_kl" in r for r in history)), None)
    prefix = "alp/" if own is None else f"alp/{own}_"
    return f"{prefix}train_rollout_kl", f"{prefix}log_ratio_abs_max"


TREND_SERIES = {  # the summary's name: the logged metric whose first and last quarter of steps are compared
    "tail": "alp/log_ratio_abs_max",
    "kl": "alp/train_rollout_kl",
    **{f"{name}_tail": f"alp/{name}_log_ratio_abs_max" for name in OWN_RATIO_SERIES},
    **{f"{name}_kl": f"alp/{name}_train_rollout_kl" for name in OWN_RATIO_SERIES},
}


def ratio_trend(history: list[dict]) -> dict:
    """Does the ratio's tail grow over training (the paper's Figure 1)? For each of `TREND_SERIES` that the run
    logged: the mean over the first and over the last quarter of its finite logged steps (`<name>_early`,
    `<name>_late`), their ratio (`<name>_growth`), and how many steps logged it as inf or NaN (`<name>_nonfinite`: a
    blow-up, which the means leave out)."""
    trend = {}
    for name, key in TREND_SERIES.items():
        logged = [r[key] for r in history if isinstance(r.get(key), (int, float))]
        values = [v for v in logged if math.isfinite(v)]
        if len(values) < 2:
            continue
        trend[f"{name}_nonfinite"] = len(logged) - len(values)
        quarter = max(1, len(values) // 4)
        early, late = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
        trend.update({f"{name}_early": early, f"{name}_late": late, f"{name}_growth": late / early if early else None})
    return trend


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
