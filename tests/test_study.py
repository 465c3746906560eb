"""`alp-trl study`: a 2-point intervention grid and a 1-method training grid on the tiny model, 1 seed, resumable."""

import ast
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alp_trl import study, train_launch
from alp_trl.intervention import RolloutBatch


def _grid(tmp_path, model_dir, **extra) -> str:
    grid = {
        "model": str(model_dir),
        "seeds": [0],
        "experiments": [
            {
                "kind": "intervention",
                "name": "iv",
                "data": {
                    "num_prompts": 2,
                    "num_generations": 2,
                    "max_new_tokens": 6,
                    "batch_size": 4,
                    "reward": "diversity",
                },
                "engines": [{"rollout_mismatch": "logit_noise", "rollout_mismatch_std": 0.5}],
                "update_lr": 1e-3,
                "bypass_lr_multipliers": [0.5, 2],
                "perturbations": {"product": {"perturb_sigma_init": [0.01, 0.5]}},
            }
        ],
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def test_intervention_grid_runs_resumes_and_reports(tmp_path, saved_model_dir):
    grid = _grid(tmp_path, saved_model_dir)
    out, report = tmp_path / "out", tmp_path / "evidence.md"
    results = study.main(["--grid", grid, "--out", str(out), "--report", str(report)])
    records = results["records"]
    assert [r["unit"]["id"] for r in records] == [
        "iv__logit_noise0.5__seed0__bypass",
        "iv__logit_noise0.5__seed0__absolute-s0.01-all",
        "iv__logit_noise0.5__seed0__absolute-s0.5-all",
    ]
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    small, large = (r["result"] for r in records[1:])
    # the same rollouts for both configs: the unperturbed envelope is identical, the stronger noise widens it more
    assert small["unperturbed"] == large["unperturbed"]
    assert large["perturbed"]["width_p01_p99"] > small["perturbed"]["width_p01_p99"]
    bypass = records[0]["result"]["points"]
    assert [p["lr"] for p in bypass] == [5e-4, 2e-3] and bypass[1]["update_size_kl"] > bypass[0]["update_size_kl"]
    text = report.read_text()
    assert "| logit_noise0.5 | absolute | 0.01 | all | 1 |" in text and "alp-trl study --grid" in text
    # each unit names the code that made it: this checkout's commit (`+dirty` with uncommitted changes), none outside git
    package = str(Path(study.__file__).parent)
    head = subprocess.run(["git", "-C", package, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    commits = {r["commit"] for r in records}
    if head.returncode == 0:
        assert len(commits) == 1 and re.fullmatch(head.stdout.strip() + r"(\+dirty)?", commits.pop() or "")
    else:
        assert commits == {None}
    assert f"code commit: {records[0]['commit'] or 'not recorded'} (3 units)." in text
    assert (tmp_path / "images" / "evidence_intervention.png").stat().st_size > 10_000
    assert "![intervention](images/evidence_intervention.png)" in text
    cache = torch.load(out / "cache" / "iv__logit_noise0.5__seed0.pt", weights_only=False)
    assert {type(b) for b in cache["batches"]} == {tuple}, "on disk the rollouts stay plain 5-tuples"
    # resumable: a second run does nothing new; a deleted unit is redone alone
    before = {p.name: p.stat().st_mtime for p in (out / "units").iterdir()}
    (out / "units" / "iv__logit_noise0.5__seed0__absolute-s0.5-all.json").unlink()
    study.main(["--grid", grid, "--out", str(out)])
    after = {p.name: p.stat().st_mtime for p in (out / "units").iterdir()}
    assert set(after) == set(before)
    changed = {name for name in after if name not in before or after[name] != before[name]}
    assert changed == {"iv__logit_noise0.5__seed0__absolute-s0.5-all.json"}
    assert json.loads((out / "results.json").read_text())["records"][2]["status"] == "ok"


def test_figure2_grid_stores_binned_envelopes_after_an_sgd_update_and_reports_them(tmp_path, saved_model_dir):
    """`binned_envelopes` with `update_optimizer: sgd`: each envelope's bins hold every rollout token once, Bypass at
    the same lr is the one compared, and the report's Figure 2 table shows the tokens per bin."""
    grid_path = _grid(tmp_path, saved_model_dir)
    grid = yaml.safe_load(Path(grid_path).read_text())
    grid["experiments"][0].update(
        binned_envelopes=True,
        envelope_bins=[0.0, 0.1, 0.5, 1.000001],
        update_optimizer="sgd",
        update_lr=0.02,
        bypass_lr_multipliers=[0.5, 1, 2],
    )
    grid["experiments"][0]["perturbations"] = {"list": [{"perturb_sigma_init": 0.05}]}
    Path(grid_path).write_text(yaml.safe_dump(grid))
    out, report = tmp_path / "out", tmp_path / "figure2.md"
    results = study.main(["--grid", grid_path, "--out", str(out), "--report", str(report)])
    bypass, alp = (r["result"] for r in results["records"])
    cache = torch.load(out / "cache" / "iv__logit_noise0.5__seed0.pt", weights_only=False)
    tokens = int(sum(int(torch.as_tensor(b[3]).sum()) for b in cache["batches"]))
    envelopes = [bypass["envelope_before"], *(p["envelope"] for p in bypass["points"])]
    envelopes += list(alp["alp_update"]["envelopes"].values())
    for bins in envelopes:
        assert sum(b["count"] for b in bins) == tokens and all(b["q01"] <= b["q50"] <= b["q99"] for b in bins)
    assert {b["hi"] for b in bypass["envelope_before"]} <= {0.1, 0.5, 1.0}
    assert bypass["update"] == {"optimizer": "sgd", "steps": 1} and alp["alp_update"]["optimizer"] == "sgd"
    small, same_lr, large = bypass["points"]
    assert large["update_size_kl"] > small["update_size_kl"] > 0
    text = report.read_text()
    assert "## Figure 2: the log-ratio envelope by rollout probability" in text
    first_bin, bypass_bin = bypass["envelope_before"][0], same_lr["envelope"][0]
    # one seed: the values alone; the Bypass column is the update at ALP's learning rate
    row = f"| [{first_bin['lo']:g}, {first_bin['hi']:g}) | {first_bin['count']} | "
    row += f"{first_bin['q99'] - first_bin['q01']:.3g} | {bypass_bin['q99'] - bypass_bin['q01']:.3g} |"
    assert row in text, text[text.index("## Figure 2") :]
    # figures are named after their report: figure2.md's never overwrite evidence.md's in the same images folder
    for figure in ("intervention", "envelopes"):
        assert (tmp_path / "images" / f"figure2_{figure}.png").stat().st_size > 10_000
        assert f"(images/figure2_{figure}.png)" in text
    assert not (tmp_path / "images" / "evidence_intervention.png").exists()


def test_envelope_bin_summary_by_hand(tmp_path):
    """Two seeds, one bin: widths averaged over seeds, tokens summed, the seeds where ALP's perturbed envelope is
    narrower than Bypass's at the same lr counted; Bypass's width at ALP's update size interpolated as a power law
    (seed 0: sizes 0.01 and 0.04 give widths 4 and 8, so 4 * sqrt(2) at 0.02), n/a outside its range (seed 1)."""

    def env(q01, q99, count=10):
        return [{"lo": 0.0, "hi": 0.5, "count": count, "q01": q01, "q99": q99}]

    def bypass_unit(seed, before, after, larger):
        points = [
            {"lr": 0.1, "update_size_kl": 0.01, "envelope": after},
            {"lr": 0.4, "update_size_kl": 0.04, "envelope": larger},
        ]
        return {
            "unit": {"type": "bypass_curve", "experiment": "f", "engine": {"engine": "vllm"}, "seed": seed},
            "status": "ok",
            "result": {"envelope_before": before, "points": points},
        }

    def alp_unit(seed, perturbed, unperturbed, size):
        config = {"perturb_sigma_init": 0.02, "perturb_noise_scale": "absolute", "perturb_layers": "all"}
        envelopes = {"perturbed_vs_rollout": perturbed, "unperturbed_vs_rollout": unperturbed}
        return {
            "unit": {
                "type": "perturbation",
                "experiment": "f",
                "engine": {"engine": "vllm"},
                "seed": seed,
                "config": config,
            },
            "status": "ok",
            "result": {"alp_update": {"lr": 0.1, "update_size_kl": size, "envelopes": envelopes}},
        }

    records = [
        bypass_unit(0, env(-1.0, 1.0, 7), env(-2.0, 2.0), env(-4.0, 4.0)),
        alp_unit(0, env(-1.0, 1.0), env(-0.5, 0.5), 0.02),  # perturbed width 2 < Bypass 4; unperturbed 1 < 5.66
        bypass_unit(1, env(-1.0, 3.0, 5), env(-1.0, 1.0), env(-1.0, 3.0)),
        alp_unit(1, env(-2.0, 2.0), env(-0.5, 1.5), 0.08),  # 4 > 2; ALP's update larger than any Bypass one
    ]
    (row,) = study.envelope_rows(records)
    assert row["key"] == ("f", "vllm-bfloat16", "absolute-s0.02-all")
    (entry,) = study.bin_summary(row)
    assert entry["tokens"] == 12 and entry["seeds"] == 2 and entry["alp_narrower_seeds"] == 1
    assert entry["before_width"] == pytest.approx(3.0) and entry["bypass_width"] == pytest.approx(3.0)
    assert entry["alp_perturbed_width"] == pytest.approx(3.0) and entry["alp_unperturbed_width"] == pytest.approx(1.5)
    assert entry["bypass_width_std"] == pytest.approx(2**0.5) and entry["before_q99"] == pytest.approx(2.0)
    assert entry["bypass_matched_width"] == pytest.approx(4 * 2**0.5) and entry["matched_seeds"] == 1
    assert entry["alp_unperturbed_narrower_matched_seeds"] == 1
    # across rows (engines x sigmas) the bins' counts add up; one row alone is its own table
    assert study.envelope_report.bin_tally([row]) == []
    assert "| [0, 0.5) | 2 of 4 | 2 of 2 |" in study.envelope_report.bin_tally([row, row])
    # a seed whose update did not move (every advantage 0) is left out and named
    still = alp_unit(2, env(-1.0, 1.0), env(-1.0, 1.0), 0.0)
    still["result"]["alp_update"]["update_size_reverse_k3"] = 0.0
    records += [bypass_unit(2, env(-1.0, 1.0), env(-1.0, 1.0), env(-1.0, 1.0)), still]
    (row,) = study.envelope_rows(records)
    assert [s["seed"] for s in row["seeds"]] == [0, 1] and row["no_signal"] == [2]
    assert "no learning signal (every rollout rewarded alike, so no update): [2]" in "\n".join(
        study.envelope_section(records, str(tmp_path / "images" / "report"))
    )


def test_intervention_engine_and_optimizer_are_checked_before_anything_runs(tmp_path):
    binned = {"kind": "intervention", "name": "iv", "engines": [{}], "binned_envelopes": True}
    path = tmp_path / "b.yaml"
    path.write_text(
        yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [{**binned, "bypass_lr_multipliers": [2]}]})
    )
    with pytest.raises(ValueError, match=r"bypass_lr_multipliers` must include 1 with `binned_envelopes`"):
        study.load_grid(str(path))
    experiment = {"kind": "intervention", "name": "iv", "engines": [{"engine": "sglang"}], "perturbations": {}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [experiment]}))
    with pytest.raises(ValueError, match=r"engine.*allowed values are \['vllm'\]"):
        study.load_grid(str(path))
    experiment.update(engines=[{"engine": "vllm"}], update_optimizer="adam")
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [experiment]}))
    with pytest.raises(ValueError, match=r"update_optimizer.*allowed values are \['adamw', 'sgd'\]"):
        study.load_grid(str(path))
    experiment["update_optimizer"] = "sgd"
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [experiment]}))
    units = study.plan_units(study.load_grid(str(path)))
    assert units[0]["id"] == "iv__vllm-bfloat16__seed0__bypass"


def test_matched_bypass_interpolates_as_a_power_law():
    points = [
        {"update_size_kl": 1e-4, "vs_rollout": {"kl_k3": 0.01}},
        {"update_size_kl": 1e-2, "vs_rollout": {"kl_k3": 0.03}},
    ]
    assert study.matched_bypass(points, 1e-3) == pytest.approx(0.01 * 3**0.5)
    proportional = [{"update_size_kl": x, "vs_rollout": {"kl_k3": 2 * x}} for x in (0.002, 0.01)]
    assert study.matched_bypass(proportional, 0.0067) == pytest.approx(0.0134), "y = 2x is interpolated exactly"
    assert study.matched_bypass(points, 1e-1) is None and study.matched_bypass(points, 1e-5) is None


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


def test_bad_grid_is_refused_naming_the_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [{"kind": "sweep", "name": "x"}]}))
    with pytest.raises(SystemExit):
        study.main(["--grid", str(path), "--out", str(tmp_path / "o")])
    assert "experiments[0].kind" in capsys.readouterr().err


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


def test_report_only_shows_unrun_units_as_pending_not_failed(tmp_path, saved_model_dir):
    grid = _grid(tmp_path, saved_model_dir)
    report = tmp_path / "r.md"
    results = study.main(["--grid", grid, "--out", str(tmp_path / "o"), "--report", str(report), "--report-only"])
    assert [r["status"] for r in results["records"]] == ["not run"] * 3
    text = report.read_text()
    assert "0 done, 0 failed, 3 not run yet" in text and "(not run yet: [0])" in text and "failed: [" not in text


def test_training_report_aggregates_seeds_by_method_with_the_grids_spike_threshold(tmp_path):
    def record(method, seed, kls, rewards, status="ok"):
        history = [
            {"step": i + 1, "grad_norm": 1.0, "alp/train_rollout_kl": kl, "reward": r, "entropy": 1.0 - 0.1 * i}
            for i, (kl, r) in enumerate(zip(kls, rewards))
        ]
        unit = {"id": f"st__{method}__seed{seed}", "type": "train", "experiment": "st", "method": method, "seed": seed}
        if status != "ok":
            return {"unit": unit, "status": status, "error": "RuntimeError: boom"}
        # the stored summary used another threshold: the report recomputes it from the history
        return {"unit": unit, "status": "ok", "result": {"history": history, "summary": {"spike_frac": 9.0}}}

    experiment = {"kind": "train", "name": "st", "spike_kl": 0.5, "methods": {"A": {}, "B": {}}}
    records = [
        record("A", 0, [0.1, 0.6], [0.0, 0.5]),  # 1 of 2 steps above 0.5
        record("A", 1, [0.1, 0.2], [0.2, 0.3]),  # none
        record("B", 0, [0.9, 0.9], [0.1, 0.1]),
        record("B", 1, [], [], status="failed"),
        {
            "unit": {"id": "b0", "type": "eval_base", "experiment": "st", "method": study.BASE_MODEL, "seed": 0},
            "status": "ok",
            "result": {"summary": {"eval_avg_at_k": 0.25}},
        },
    ]
    results = {
        "grid": {"model": "m", "seeds": [0, 1], "experiments": [experiment]},
        "grid_path": "g",
        "records": records,
    }
    report = tmp_path / "docs" / "evidence.md"
    report.parent.mkdir()
    study.write_report(results, str(report), "cmd")
    text = report.read_text()
    # A: spike frac (0.5 + 0) / 2 = 0.25 ± 0.35; max KL 0.6 and 0.2 -> 0.4 ± 0.28; final reward 0.5, 0.3 -> 0.4 ± 0.14
    assert "| A | 2 |  | 0.4 ± 0.28 | 1 ± 0 | 0.25 ± 0.35 | 0.4 ± 0.14 |" in text
    assert "| B | 1 | [1] | 0.9 | 1 | 1 | 0.1 |" in text, "the failed seed is named, the finished one kept"
    assert f"| {study.BASE_MODEL} | 1 |  | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 0.25 |" in text
    assert "| st | B | 1 | failed |" in text and "exceeds 0.5" in text
    assert (tmp_path / "docs" / "images" / "evidence_st.png").stat().st_size > 10_000


def test_the_committed_evidence_report_is_what_the_committed_units_and_grid_give(tmp_path):
    """docs/evidence.md is generated, never edited by hand: the committed units and the grid's conclusion give it."""
    repo = Path(__file__).resolve().parents[1]
    grid_path = "studies/evidence_cpu.yaml"
    grid = study.load_grid(str(repo / grid_path))
    records = study.load_records(str(repo / "docs" / "evidence"), study.plan_units(grid))
    report = tmp_path / "evidence.md"
    command = f"alp-trl study --grid {grid_path} --out docs/evidence --report docs/evidence.md"
    study.write_report({"grid": grid, "grid_path": grid_path, "records": records}, str(report), command)
    assert report.read_text() == (repo / "docs" / "evidence.md").read_text(), (
        "regenerate it: alp-trl study --grid studies/evidence_cpu.yaml --out docs/evidence "
        "--report docs/evidence.md --report-only"
    )


def test_cached_rollouts_load_as_named_batches(tmp_path, saved_model_dir):
    """A rollout cache on disk (plain 5-tuples, as every study wrote them) comes back as `RolloutBatch`es."""
    context = study.InterventionContext({"model": saved_model_dir}, str(tmp_path))
    fields = [torch.full((1, 2), float(i)) for i in range(5)]
    (tmp_path / "cache").mkdir()
    torch.save({"batches": [tuple(fields)], "temperature": 1.0}, tmp_path / "cache" / "iv__bf16__seed3.pt")
    cached = context.cached_rollouts({"name": "iv"}, {"rollout_mismatch": "bf16"}, 3)
    (batch,) = cached["batches"]
    assert isinstance(batch, RolloutBatch) and torch.equal(batch.rollout_logps, fields[4])
    assert torch.equal(batch.completion_mask, fields[3]) and torch.equal(batch.prompt_ids, fields[0])
    assert context.cached_rollouts({"name": "iv"}, {"rollout_mismatch": "bf16"}, 3) is cached, "read once"


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


def test_fisher_exact_fewer_by_hand():
    from alp_trl.study.significance import fisher_exact_fewer

    # 13 of 16 runs blew up, 8 per group: P(A has <= 5) = C(13,5) C(3,3) / C(16,8) = 1287 / 12870
    assert fisher_exact_fewer(5, 8, 8, 8) == pytest.approx(0.1)
    # 12 of 16: P(A <= 4) = C(12,4) C(4,4) / C(16,8) = 495 / 12870
    assert fisher_exact_fewer(4, 8, 8, 8) == pytest.approx(495 / 12870)
    assert fisher_exact_fewer(0, 1, 1, 1) == pytest.approx(0.5)  # one event, either run equally likely
    assert fisher_exact_fewer(8, 8, 8, 8) == 1.0 and fisher_exact_fewer(8, 8, 0, 8) == 1.0
    # unequal groups: 2 events in 5 + 3 runs, A (5 runs) has 0: C(2,0) C(6,5) / C(8,5) = 6 / 56
    assert fisher_exact_fewer(0, 5, 2, 3) == pytest.approx(6 / 56)
    with pytest.raises(ValueError, match="events_b must be between 0 and runs_b"):
        fisher_exact_fewer(1, 8, 9, 8)


def test_training_report_tests_blowups_against_bypass(tmp_path):
    def record(method, seed, tail):
        history = [
            {"step": i + 1, "alp/train_rollout_kl": 0.01, "alp/log_ratio_abs_max": t, "grad_norm": 1.0}
            for i, t in enumerate([1.0, tail])
        ]
        unit = {"id": f"f1__{method}__seed{seed}", "type": "train", "experiment": "f1", "method": method, "seed": seed}
        return {"unit": unit, "status": "ok", "result": {"history": history, "summary": {}}}

    methods = {"Plain": {"off_policy_correction": "bypass"}, "ALP": {"off_policy_correction": "alp"}, "M": {}}
    experiment = {"kind": "train", "name": "f1", "blowup_log_ratio": 15.0, "methods": methods}
    # Plain blows up in all 3 runs, ALP in none, M in 2 of 3
    records = [record("Plain", s, 20.0) for s in range(3)] + [record("ALP", s, 2.0) for s in range(3)]
    records += [record("M", 0, 2.0), record("M", 1, 16.0), record("M", 2, 30.0)]
    results = {
        "grid": {"model": "m", "seeds": [0, 1, 2], "experiments": [experiment]},
        "grid_path": "g",
        "records": records,
    }
    report = tmp_path / "evidence.md"
    study.write_report(results, str(report), "cmd")
    text = report.read_text()
    assert "| Plain | 3 |" in text and text.count(" | 3 of 3 |") == 1 and " | 0 of 3 |" in text
    # ALP 0 of 3 vs 3 of 3: C(3,0) C(3,3) / C(6,3) = 1/20; M 2 of 3 vs 3 of 3: 5 events, P(<= 2) = C(5,2) / C(6,3)
    assert "- ALP: 0 of 3 against Plain's 3 of 3, p = 0.05" in text
    assert "- M: 2 of 3 against Plain's 3 of 3, p = 0.5" in text
    assert "Plain: " not in text.split("Blow-ups against Plain")[1].split("\n\n")[1], "Bypass not against itself"

    def section(experiment, records):
        study.write_report(
            {**results, "grid": {**results["grid"], "experiments": [experiment]}, "records": records},
            str(report),
            "cmd",
        )
        text = report.read_text()
        return text[text.index("| method |") : text.index("Every run:")]

    # Bypass set for the whole experiment and undone by the others: still the one compared against
    shared = {**experiment, "overrides": {"off_policy_correction": "bypass"}}
    shared["methods"] = {"Plain": {}, "ALP": {"off_policy_correction": "alp"}, "M": {"off_policy_correction": "alp"}}
    assert "- ALP: 0 of 3 against Plain's 3 of 3, p = 0.05" in section(shared, records)
    # no method is Bypass, or Bypass alone: nothing to test
    assert "Blow-ups against" not in section({**experiment, "methods": {"ALP": {}, "M": {}}}, records[3:])
    assert "Blow-ups against" not in section({**experiment, "methods": {"Plain": methods["Plain"]}}, records[:3])
    # Bypass never blew up: said so, no p-values
    calm = [record("Plain", s, 2.0) for s in range(3)] + records[3:]
    text = section(experiment, calm)
    assert "No Plain run blew up (3 judged)" in text and "p = " not in text


def test_an_interrupted_cache_write_leaves_the_previous_file_whole(tmp_path):
    from alp_trl.study.atomic_files import save_torch_atomically, write_json_atomically

    path = str(tmp_path / "cache" / "unit.pt")
    save_torch_atomically({"batches": [(torch.ones(2),)]}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled: the write fails part way
        save_torch_atomically({"batches": [(torch.zeros(2),)], "bad": lambda: 0}, path)
    assert torch.equal(torch.load(path, weights_only=False)["batches"][0][0], torch.ones(2))
    write_json_atomically(str(tmp_path / "scale.json"), {"absolute": 0.01})
    with pytest.raises(TypeError):
        write_json_atomically(str(tmp_path / "scale.json"), {"absolute": object()})
    assert json.loads((tmp_path / "scale.json").read_text()) == {"absolute": 0.01}


def test_the_study_package_imports_point_down():
    """Each module of `alp_trl.study` imports only the modules before it (and `alp_trl` modules outside it)."""
    order = [
        "significance",
        "atomic_files",
        "grid",
        "engine_rollouts",
        "intervention_units",
        "coverage_units",
        "training_units",
        "figures",
        "coverage_report",
        "envelope_report",
        "report",
        "runner",
        "__init__",
        "__main__",
    ]
    folder = Path(study.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(order)
    for index, module in enumerate(order):
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = {  # `from . import main` imports the package itself, `__init__`
            node.module.split(".")[0] if node.module else "__init__"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1
        }
        assert imported <= set(order[:index]), f"{module} imports {imported - set(order[:index])}"


def test_coverage_grid_runs_resumes_and_reports_a_verdict(tmp_path, saved_model_dir):
    """A coverage experiment on the tiny model: units in order (engine by engine), the engine's scale computed once
    and reused by the next seed, the same rollouts for every sigma, a resumed run that recomputes nothing, and the
    report's verdict table."""
    grid = {
        "model": str(saved_model_dir),
        "seeds": [0, 1],
        "experiments": [
            {
                "kind": "coverage",
                "name": "cov",
                "draws": 2,
                "data": {"num_prompts": 2, "num_generations": 2, "max_new_tokens": 5, "batch_size": 4},
                "sigma_multipliers": [1, 2],
                "noise_scales": ["absolute"],
                "engines": [
                    {"rollout_mismatch": "hidden_noise", "rollout_mismatch_std": 0.3, "positive_control": True},
                    {"rollout_mismatch": "bf16_activations"},
                ],
            }
        ],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out, report = tmp_path / "out", tmp_path / "coverage.md"
    results = study.main(["--grid", str(path), "--out", str(out), "--report", str(report)])
    records = results["records"]
    assert [r["unit"]["id"] for r in records] == [
        "cov__base__hidden_noise0.3__seed0",
        "cov__base__hidden_noise0.3__seed1",
        "cov__base__bf16_activations__seed0",
        "cov__base__bf16_activations__seed1",
    ]
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    first, second = records[0]["result"], records[1]["result"]
    assert first["scale"] == second["scale"] and first["scale"]["from_seed"] == 0  # computed once, cached
    assert first["scale"]["absolute"] > 0
    one, two = first["configs"]
    assert (one["multiplier"], two["multiplier"]) == (1, 2)
    assert two["sigma"] == pytest.approx(2 * one["sigma"])
    assert one["rows"]["unperturbed"] == two["rows"]["unperturbed"]  # the same rollouts and policy for every sigma
    for name in ("averaged", "temperature", "one_draw"):
        assert one["rows"][name]["count"] == one["rows"]["unperturbed"]["count"] == first["num_tokens"]
    assert (out / "cache" / "cov__base__hidden_noise0.3__seed0.pt").exists()  # the rollouts are kept

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()}
    study.main(["--grid", str(path), "--out", str(out)])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "units").iterdir()} == stamps, "nothing recomputed"

    text = report.read_text()
    # a seed's win at the setting fixed in advance (1x, absolute): the paired k1 KL of the averaged policy below both
    rows = [r["result"]["configs"][0]["rows"] for r in records[:2]]
    wins = sum(r["averaged"]["kl_k1"] < min(r["unperturbed"]["kl_k1"], r["temperature"]["kl_k1"]) for r in rows)
    assert "## Marginal coverage" in text
    assert f"| base | hidden_noise0.3 | absolute | 1 | {one['sigma']:.3g} | 2 |" in text
    winners = [
        seed
        for seed, r in enumerate(rows)
        if r["averaged"]["kl_k1"] < min(r["unperturbed"]["kl_k1"], r["temperature"]["kl_k1"])
    ]
    assert f"| base | hidden_noise0.3 (positive control) | {wins} of 2 | {winners or 'none'} |" in text
    # the per-sequence values give the pooled paired difference, which is the difference of the pooled k1 KLs
    from alp_trl.study.coverage_report import coverage_rows, pooled_difference

    row = next(r for r in coverage_rows(records) if r["key"][2:] == ("hidden_noise0.3", "absolute", 1))
    value, low, high = pooled_difference(row["seeds"], "unperturbed")
    tokens = sum(r["unperturbed"]["count"] for r in rows)
    expected = sum((r["averaged"]["kl_k1"] - r["unperturbed"]["kl_k1"]) * r["unperturbed"]["count"] for r in rows)
    assert value == pytest.approx(expected / tokens, abs=1e-9) and low <= value <= high
    assert "provisional" in text  # 2 seeds, fewer than the 5 a verdict needs


def test_coverage_grid_errors_name_the_key(tmp_path):
    path = tmp_path / "grid.yaml"
    experiment = {"kind": "coverage", "name": "c", "engines": [{"engine": "sglang"}]}
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [experiment]}))
    with pytest.raises(ValueError, match=r"allowed values are \['vllm'\]"):
        study.load_grid(str(path))
    experiment.update(engines=[{"rollout_mismatch": "bf16"}], checkpoints={"sharp": {"overrides": {}}})
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [experiment]}))
    with pytest.raises(ValueError, match="checkpoints.sharp needs a `recipe`"):
        study.load_grid(str(path))


def test_after_update_widths_and_share_of_reduction_by_hand():
    """The after-update comparison of the report: widths of each method's own ratio at the same lr, and ALP's share of
    Bypass's reduction of the KL to the rollout with Bypass matched to ALP's update size in each KL direction."""
    from alp_trl.study.report import _after_update

    result = {
        "unperturbed": {"kl_k3": 0.30},
        "alp_update": {
            "lr": 1e-5,
            "update_size_kl": 0.02,
            "update_size_reverse_k3": 0.04,
            "unperturbed_vs_rollout": {"kl_k3": 0.27},
            "perturbed_vs_rollout": {"width_p01_p99": 4.4},
        },
    }

    def point(lr, size, reverse, kl, width):
        return {
            "lr": lr,
            "update_size_kl": size,
            "update_size_reverse_k3": reverse,
            "vs_rollout": {"kl_k3": kl, "width_p01_p99": width},
        }

    points = [point(5e-6, 0.01, 0.01, 0.28, 4.1), point(1e-5, 0.04, 0.04, 0.26, 4.0)]
    values = _after_update(result, points)
    assert values["width_bypass_ratio_after"] == 4.0 and values["after_width_ratio"] == pytest.approx(1.1)
    forward = study.matched_bypass(points, 0.02)  # power law between (0.01, 0.28) and (0.04, 0.26)
    assert values["bypass_matched_kl_forward"] == pytest.approx(forward)
    assert values["share_of_reduction_forward"] == pytest.approx((0.30 - 0.27) / (0.30 - forward))
    assert values["bypass_matched_kl_reverse"] == pytest.approx(0.26)  # reverse size 0.04: the second point
    assert values["share_of_reduction_reverse"] == pytest.approx(0.03 / 0.04)


def test_every_committed_grid_is_valid():
    """Each grid in studies/ passes `load_grid`, plans units with unique ids, and names recipes that exist."""
    repo = Path(__file__).resolve().parents[1]
    grids = sorted((repo / "studies").glob("*.yaml"))
    assert len(grids) >= 4
    for path in grids:
        grid = study.load_grid(str(path))
        ids = [u["id"] for u in study.plan_units(grid)]
        assert ids and len(ids) == len(set(ids)), path.name
        for experiment in grid["experiments"]:
            recipes = [experiment.get("recipe")] + [
                c.get("recipe") for c in (experiment.get("checkpoints") or {}).values()
            ]
            assert all((repo / r).exists() for r in recipes if r), (path.name, recipes)


def test_coverage_overall_verdict_follows_the_issue_rule():
    """For the paper only with a positive control AND a realistic engine won; against when even every positive control
    is lost; the engines named in each case; a missing engine named as not measured, never counted as a loss."""
    from alp_trl.study.coverage_report import overall_verdict

    def v(engine, control, holds, seeds=5):
        return {"key": ("c", "base", engine), "positive_control": control, "holds": holds, "seeds": seeds}

    planned = ["hn0.02", "hn0.1", "vllm", "logit"]
    only = overall_verdict([v("hn0.02", True, False), v("hn0.1", True, True), v("vllm", False, False)], planned)
    assert only == [
        "- **base**: closer on the positive control only (hn0.1; not on hn0.02), not on the realistic engines measured "
        "(vllm); not measured yet: logit."
    ]
    both = overall_verdict([v("hn0.1", True, True), v("vllm", False, True, seeds=3)], ["hn0.1", "vllm"])
    assert both == [
        "- **base**: for the paper: closer on the positive control and on at least one realistic engine "
        "(provisional: 1 engine(s) with fewer than 5 seeds)."
    ]
    against = overall_verdict([v("hn0.1", True, False), v("vllm", False, True)], ["hn0.1", "vllm"])
    assert against[0].startswith("- **base**: against the paper's mechanism")


def test_coverage_excess_is_relative_to_the_mean_policy_kl_not_seed_by_seed():
    """A seed whose k1 estimate of the policy's KL is near 0 must not blow the figure's ratio up: the excess is
    normalised by the mean over seeds (hand values: policy KLs 0.02 and 0.0, mean 0.01)."""
    from alp_trl.study.figures import coverage_excess

    seeds = [
        {"kl_unperturbed": 0.02, "kl_averaged": 0.01, "kl_one_draw": 0.05},
        {"kl_unperturbed": 0.0, "kl_averaged": 0.002, "kl_one_draw": 0.03},
    ]
    mean, std = coverage_excess(seeds, "averaged")
    assert mean == pytest.approx((-1.0 + 0.2) / 2) and std == pytest.approx(abs(-1.0 - 0.2) / 2**0.5)
    assert coverage_excess(seeds[:1], "one_draw") == (pytest.approx(1.5), 0.0)
