"""`alp_trl.study.coverage_units`: the marginal-coverage grid on the tiny model, resumable, with its verdict."""

import pytest
import yaml

from alp_trl import study


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
