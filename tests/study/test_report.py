"""`alp_trl.study.report`: the markdown report, by value; the committed evidence report is what its units give."""

from pathlib import Path

import pytest

from alp_trl import study

from .grids import intervention_grid


def test_report_only_shows_unrun_units_as_pending_not_failed(tmp_path, saved_model_dir):
    grid = intervention_grid(tmp_path, saved_model_dir)
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
    repo = Path(__file__).resolve().parents[2]
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


def _two_step_run(method, seed, tail):
    """A finished 2-step training run of experiment `f1` whose largest |log ratio| is 1 then `tail`."""
    history = [
        {"step": i + 1, "alp/train_rollout_kl": 0.01, "alp/log_ratio_abs_max": t, "grad_norm": 1.0}
        for i, t in enumerate([1.0, tail])
    ]
    unit = {"id": f"f1__{method}__seed{seed}", "type": "train", "experiment": "f1", "method": method, "seed": seed}
    return {"unit": unit, "status": "ok", "result": {"history": history, "summary": {}}}


def test_training_report_tests_blowups_against_bypass(tmp_path):
    record = _two_step_run
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
    table = text.split("Blow-ups against Plain")[0]  # the method table, before the tests and the sensitivity table
    assert "| Plain | 3 |" in table and table.count(" | 3 of 3 |") == 1 and " | 0 of 3 |" in table
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
    # where on their generation batch the steps over the limits fell (each run's is step 2): pooled per method
    assert "by their update on the generation batch" not in section(experiment, records), "batches not declared"
    batched = {**experiment, "overrides": {"steps_per_generation": 2}}
    text = section(batched, records)
    assert "(2 updates per batch;" in text and "- Plain: 0 / 3\n- ALP: 0 / 0\n- M: 0 / 2\n" in text
    assert "by their update on the generation batch" not in section(batched, calm[3:6])


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


def test_training_report_applies_the_verdict_rule_fixed_in_the_grid(tmp_path):
    methods = {"Plain": {"off_policy_correction": "bypass"}, "ALP": {"off_policy_correction": "alp"}}
    rule = {"method": "ALP", "for_margin": 2, "runs": 4}
    experiment = {"kind": "train", "name": "f1", "blowup_log_ratio": 15.0, "methods": methods, "verdict": rule}
    report = tmp_path / "r.md"

    def verdict(plain_tails, alp_tails, experiment=experiment):
        records = [_two_step_run("Plain", s, tail) for s, tail in enumerate(plain_tails)]
        records += [_two_step_run("ALP", s, tail) for s, tail in enumerate(alp_tails)]
        grid = {"model": "m", "seeds": [0, 1, 2, 3], "experiments": [experiment]}
        study.write_report({"grid": grid, "grid_path": "g", "records": records}, str(report), "cmd")
        text = report.read_text()
        return next((line for line in text.splitlines() if line.startswith("Verdict:")), None), text

    line, text = verdict([20.0, 20.0], [2.0, 2.0])
    assert (
        "The verdict rule fixed in the grid: for the paper if ALP blows up in at least 2 fewer of its 4 runs than "
        "Plain, against if in as many or more, otherwise no verdict." in text
    )
    # 2 of 2 vs 0 of 2 with 2 runs each to come: ALP ends 0-2 blow-ups, Plain 2-4, so 0 to 4 fewer
    expected = "Verdict: open, 2 of 4 runs of ALP and 2 of 4 of Plain judged, 0 and 2 of them blew up; "
    assert line == expected + "the runs still to come can give: for, no verdict, against."
    # 3 of 3 vs 0 of 3: at least 3 - 1 = 2 fewer whatever the last run of each gives, so settled before them
    assert verdict([20.0] * 3, [2.0] * 3)[0] == (
        "Verdict: **for**, settled: no outcome of the runs still to come (2) can change it "
        "(ALP blew up in 0 of 3 runs, Plain in 3 of 3 so far)."
    )
    # 2 of 2 vs 3 of 4: ALP ends with 2-4 blow-ups, Plain with 3, so at most 1 fewer: "for" is out of reach
    assert verdict([20.0, 2.0, 20.0, 20.0], [30.0, 30.0])[0].endswith(
        "the runs still to come can give: no verdict, against."
    )
    # 3 of 3 vs 3 of 4: ALP ends with 3 or 4, Plain with 3: against, whatever ALP's last run does
    assert verdict([20.0, 2.0, 20.0, 20.0], [30.0] * 3)[0] == (
        "Verdict: **against**, settled: no outcome of the runs still to come (1) can change it "
        "(ALP blew up in 3 of 3 runs, Plain in 3 of 4 so far)."
    )
    assert (
        verdict([20.0] * 4, [2.0, 2.0, 30.0, 2.0])[0]
        == "Verdict: **for** (ALP blew up in 1 of 4 runs, Plain in 4 of 4)."
    )
    assert (
        verdict([20.0] * 4, [2.0, 30.0, 30.0, 30.0])[0]
        == "Verdict: **no verdict** (ALP blew up in 3 of 4 runs, Plain in 4 of 4)."
    )
    assert verdict([2.0] * 4, [2.0] * 4)[0] == "Verdict: **against** (ALP blew up in 0 of 4 runs, Plain in 0 of 4)."
    # no rule in the grid: no verdict line
    no_rule = {k: v for k, v in experiment.items() if k != "verdict"}
    line, text = verdict([20.0] * 4, [2.0] * 4, no_rule)
    assert line is None and "verdict rule" not in text


def test_training_report_tabulates_the_verdict_at_scaled_limits(tmp_path):
    """|log ratio| limit 15: Plain's tails 20, 20, 14 reach 1.333, 1.333, 0.9333 of it, ALP's 2, 16, 30 reach 0.1333,
    1.067, 2. Scaled by 0.8: 3 vs 2 blown up (for, margin 1); by 1: 2 vs 2 (against); by 1.1: 2 vs 1 (for)."""
    methods = {"Plain": {"off_policy_correction": "bypass"}, "ALP": {"off_policy_correction": "alp"}}
    rule = {"method": "ALP", "for_margin": 1, "runs": 3}
    experiment = {"kind": "train", "name": "f1", "blowup_log_ratio": 15.0, "methods": methods, "verdict": rule}
    records = [_two_step_run("Plain", s, tail) for s, tail in enumerate([20.0, 20.0, 14.0])]
    records += [_two_step_run("ALP", s, tail) for s, tail in enumerate([2.0, 16.0, 30.0])]
    grid = {"model": "m", "seeds": [0, 1, 2], "experiments": [experiment]}
    report = tmp_path / "r.md"
    study.write_report({"grid": grid, "grid_path": "g", "records": records}, str(report), "cmd")
    text = report.read_text()
    assert "- Plain: 1.333, 1.333, 0.9333 (median 1.33)" in text
    assert "- ALP: 0.1333, 1.067, 2 (median 1.07)" in text
    assert "| limits x | Plain | ALP | verdict by the rule |" in text
    rows = {
        line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| 0.") or line.startswith("| 1")
    }
    assert rows["| 0.8"] == "| 0.8 | 3 of 3 | 2 of 3 | for |"
    assert rows["| 1"] == "| 1 | 2 of 3 | 2 of 3 | against |"
    assert rows["| 1.1"] == "| 1.1 | 2 of 3 | 1 of 3 | for |" and rows["| 1.25"] == "| 1.25 | 2 of 3 | 1 of 3 | for |"
    assert "Verdict: **against** (ALP blew up in 2 of 3 runs, Plain in 2 of 3)." in text, "the endpoint's own limits"
    # before every run is in, the counts without a verdict column
    study.write_report({"grid": grid, "grid_path": "g", "records": records[:-1]}, str(report), "cmd")
    text = report.read_text()
    assert "| limits x | Plain | ALP |\n" in text and "| 0.8 | 3 of 3 | 1 of 2 |\n" in text
