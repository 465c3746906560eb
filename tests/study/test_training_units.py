"""`alp_trl.study.training_units`: training units launch the entry point and are summarised by value."""

import json
import subprocess
import sys

import pytest
import yaml

from alp_trl import study, train_launch


def test_training_summary_counts_spikes_by_value():
    history = [
        {"step": 1, "grad_norm": 1.0, "alp/train_rollout_kl": 0.01, "reward": 0.1},
        {"step": 2, "grad_norm": 50.0, "alp/train_rollout_kl": 0.02, "reward": 0.3},
        {"step": 3, "grad_norm": 2.0, "alp/train_rollout_kl": 0.2, "reward": 0.2},
        {"step": 4, "grad_norm": 1.0, "alp/train_rollout_kl": 0.01, "reward": 0.25},
    ]
    summary = study.summarize_training(history, {"spike_kl": 0.1, "spike_grad_norm": 10.0})
    assert summary["spike_frac"] == 0.5 and summary["max_train_rollout_kl"] == 0.2
    assert summary["best_reward"] == 0.3 and summary["final_reward"] == 0.25 and summary["late_reward"] == 0.225


def test_ratio_trend_compares_the_first_and_last_quarter_of_the_logged_steps():
    history = [
        {"step": i, "alp/log_ratio_abs_max": float(v), "alp/train_rollout_kl": 0.01, "grad_norm": 1.0}
        for i, v in enumerate([1, 3, 2, 2, 2, 2, 8, 4], 1)
    ]
    history.insert(3, {"step": 3.5, "loss": 0.1})  # a step that did not log the ratio is not counted
    trend = study.summarize_training(history, {})
    assert trend["tail_early"] == 2.0 and trend["tail_late"] == 6.0 and trend["tail_growth"] == 3.0
    assert trend["kl_growth"] == pytest.approx(1.0) and "unperturbed_tail_early" not in trend
    assert trend["tail_nonfinite"] == 0 and trend["late_spike_steps"] == 0
    history[-1]["alp/log_ratio_abs_max"] = float("inf")  # a blow-up: counted, not averaged
    history[-2]["grad_norm"] = 50.0  # a spike in the second half
    limits = {"blowup_kl": 0.5, "blowup_log_ratio": 15.0}
    trend = study.summarize_training(history, {"spike_grad_norm": 10.0, **limits})
    assert trend["tail_nonfinite"] == 1 and trend["tail_late"] == 8.0 and trend["late_spike_steps"] == 1
    assert trend["blowup_step"] == 8  # the infinite tail; below the limits no step blows up
    assert study.summarize_training(history[:-1], limits)["blowup_step"] is None
    assert study.summarize_training(history[:-1], {"blowup_log_ratio": 7.5})["blowup_step"] == 7
    # every step over the limit is counted: 3 (step 2), 8 (step 7) and the infinite tail (step 8) above 2.5
    low = study.summarize_training(history, {"blowup_log_ratio": 2.5})
    assert (low["blowup_step"], low["blowup_step_count"]) == (2, 3) and trend["blowup_step_count"] == 1
    assert study.summarize_training(history, {})["blowup_step_count"] == 0
    assert study.summarize_training(history, {})["blowup_step"] is None, "no thresholds declared: not judged"
    # under ALP the policy's own (unperturbed) ratio decides, not the noise draw's
    alp = [{**r, "alp/unperturbed_log_ratio_abs_max": 1.0, "alp/unperturbed_train_rollout_kl": 0.01} for r in history]
    assert study.summarize_training(alp, limits)["blowup_step"] is None
    # under a MIS rejection that drops tokens the update saw the kept tokens only: the ratio over all of them decides
    mis = [{**r, "alp/log_ratio_abs_max": 1.0, "alp/all_tokens_log_ratio_abs_max": 1.0} for r in history]
    mis = [{**r, "alp/all_tokens_train_rollout_kl": 0.9 if r["step"] == 8 else 0.01} for r in mis]
    summary = study.summarize_training(mis, limits)
    assert summary["blowup_step"] == 8 and summary["all_tokens_kl_growth"] == pytest.approx((0.9 + 0.01) / 2 / 0.01)


def test_a_train_unit_launches_the_entry_point_with_the_grids_flags(tmp_path, monkeypatch):
    """The command a training unit runs (and records), by value, through the launcher `compare` uses too."""
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        with open(train_launch.metrics_path(command[command.index("--output_dir") + 1]), "w") as f:
            f.write(json.dumps({"step": 1, "grad_norm": 1.0, "alp/train_rollout_kl": 0.01, "reward": 0.5}) + "\n")
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(train_launch.subprocess, "run", fake_run)
    run_dir = tmp_path / "train" / "tr__ALP__seed1"
    run_dir.mkdir(parents=True)
    experiment = {
        "recipe": "r.yaml",
        "overrides": {"max_steps": 2, "reward_funcs": ["format"]},
        "methods": {"ALP": {"off_policy_correction": "alp"}},
    }
    unit = {"id": "tr__ALP__seed1", "method": "ALP", "seed": 1}
    result = study.run_train_unit({"model": "m"}, experiment, unit, str(tmp_path))
    expected = "alp_trl.train --config r.yaml --model_name_or_path m --output_dir " + str(run_dir)
    expected += " --seed 1 --auto_resume false --plot false --save_strategy no --max_steps 2"
    expected += ' --reward_funcs ["format"] --off_policy_correction alp'
    assert result["command"] == expected and commands[0][:2] == [sys.executable, "-m"]
    assert result["summary"]["steps"] == 1 and result["history"][0]["reward"] == 0.5


@pytest.mark.slow
def test_train_grid_runs_the_entry_point_per_method_and_seed(tmp_path, saved_model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "replaced-by-the-grid",
                "dataset_name": "builtin:arithmetic",
                "reward_funcs": ["format", "length"],
                "length_target_chars": 10,
                "per_device_train_batch_size": 4,
                "num_generations": 4,
                "max_completion_length": 8,
                "logging_steps": 1,
                "report_to": "none",
                "use_cpu": True,
                "bf16": False,
            }
        )
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "model": str(saved_model_dir),
                "seeds": [0],
                "experiments": [
                    {
                        "kind": "train",
                        "name": "tr",
                        "recipe": str(recipe),
                        "overrides": {"max_steps": 2, "rollout_mismatch": "bf16"},
                        "eval": {"benchmarks": ["arithmetic"], "k": 2, "limit": 2, "max_new_tokens": 4},
                        "methods": {"ALP": {"off_policy_correction": "alp"}, "GRPO": {"off_policy_correction": "ppo"}},
                    }
                ],
            }
        )
    )
    results = study.main(["--grid", str(grid), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.md")])
    records = results["records"]
    assert [r["status"] for r in records] == ["ok", "ok", "ok"], [r.get("error") for r in records]
    base = records[0]
    assert base["unit"]["type"] == "eval_base", "the untrained model is evaluated first, as the reference"
    assert 0.0 <= base["result"]["summary"]["eval_avg_at_k"] <= 1.0
    for record in records[1:]:
        summary = record["result"]["summary"]
        logged = [
            json.loads(line) for line in (tmp_path / "out" / "train" / record["unit"]["id"] / "metrics.jsonl").open()
        ]
        kl = [r["alp/train_rollout_kl"] for r in logged if "alp/train_rollout_kl" in r]
        assert summary["steps"] == 2 and len(kl) == 2 and summary["max_train_rollout_kl"] == max(kl) > 0
        assert 0.0 <= summary["eval_avg_at_k"] <= 1.0, "held-out accuracy after training"
    assert "| tr | GRPO | 0 | ok | 2 |" in (tmp_path / "r.md").read_text()
    text = (tmp_path / "r.md").read_text()
    assert "held-out avg@k" in text and f"| {study.BASE_MODEL} | 1 |" in text


def test_blowup_steps_are_placed_on_their_generation_batch_by_hand():
    """4 updates per batch (steps_per_generation 4): steps 1, 5, 9 are the first update on fresh rollouts, 4 and 8
    the fourth; with gradient accumulation 2 the 8 micro-steps of `num_iterations` 2 make 4 optimizer steps."""
    from alp_trl.study.training_units import batch_positions, updates_per_generation

    assert updates_per_generation({"overrides": {"steps_per_generation": 4}}) == 4
    overrides = {"steps_per_generation": 4, "num_iterations": 2, "gradient_accumulation_steps": 2}
    assert updates_per_generation({"overrides": overrides}) == 4
    assert updates_per_generation({"overrides": {}}) is None and updates_per_generation({}) is None
    assert batch_positions([4, 8, 5, 11, 180], 4) == [1, 0, 1, 3]  # 180 = 44 * 4: a fourth update
    assert batch_positions([], 4) == [0, 0, 0, 0]
    assert batch_positions([3], 1) is None and batch_positions([3], None) is None
    history = [{"step": s, "alp/train_rollout_kl": 0.9 if s in (4, 7) else 0.01} for s in range(1, 9)]
    experiment = {"blowup_kl": 0.5, "overrides": {"steps_per_generation": 4}}
    assert study.summarize_training(history, experiment)["blowup_positions"] == [0, 0, 1, 1]


def test_blowup_peak_is_the_largest_share_of_a_limit_by_hand():
    """KL 0.25 of 0.5 is 0.5 of its limit, |log ratio| 12 of 15 is 0.8: the step's share is 0.8, and the run blows
    up with both limits scaled by c exactly when its peak is above c."""
    from alp_trl.study.training_units import blowup_peak

    limits = {"blowup_kl": 0.5, "blowup_log_ratio": 15.0}
    history = [
        {"step": 1, "alp/train_rollout_kl": 0.25, "alp/log_ratio_abs_max": 12.0},
        {"step": 2, "alp/train_rollout_kl": 0.45, "alp/log_ratio_abs_max": 3.0},  # 0.9 of the KL limit
        {"step": 3, "loss": 0.1},  # logged no ratio: no share
    ]
    assert blowup_peak(history, limits) == pytest.approx(0.9)
    assert blowup_peak(history, {"blowup_log_ratio": 15.0}) == pytest.approx(0.8), "an undeclared limit is not used"
    assert blowup_peak(history, {}) is None and blowup_peak([{"step": 1, "loss": 0.1}], limits) is None
    for scale, blown in ((0.85, True), (0.95, False)):
        scaled = {key: value * scale for key, value in limits.items()}
        assert (study.summarize_training(history, scaled)["blowup_step"] is not None) is blown
    assert study.summarize_training(history, limits)["blowup_peak"] == pytest.approx(0.9)
    assert blowup_peak([*history, {"step": 4, "alp/log_ratio_abs_max": float("nan")}], limits) == float("inf")
    # a KL that is not finite blows the run up even where only the |log ratio| limit is declared
    infinite_kl = [*history, {"step": 4, "alp/train_rollout_kl": float("inf")}]
    assert blowup_peak(infinite_kl, {"blowup_log_ratio": 15.0}) == float("inf")
    assert study.summarize_training(infinite_kl, {"blowup_log_ratio": 15.0})["blowup_step"] == 4
    # under ALP the unperturbed policy's ratio is the one judged, as in `blowup_steps`
    alp = [{**r, "alp/unperturbed_train_rollout_kl": 0.05, "alp/unperturbed_log_ratio_abs_max": 16.5} for r in history]
    assert blowup_peak(alp, limits) == pytest.approx(1.1)
