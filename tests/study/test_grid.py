"""`alp_trl.study.grid`: grids are checked before anything runs, naming the key; every committed grid plans."""

from pathlib import Path

import pytest
import yaml

from alp_trl import study


def test_bad_grid_is_refused_naming_the_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [{"kind": "sweep", "name": "x"}]}))
    with pytest.raises(SystemExit):
        study.main(["--grid", str(path), "--out", str(tmp_path / "o")])
    assert "experiments[0].kind" in capsys.readouterr().err


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


def test_every_committed_grid_is_valid():
    """Each grid in studies/ passes `load_grid`, plans units with unique ids, and names recipes that exist."""
    repo = Path(__file__).resolve().parents[2]
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


def test_a_verdict_rule_is_checked_naming_the_key(tmp_path):
    path = tmp_path / "grid.yaml"
    methods = {"Bypass": {"off_policy_correction": "bypass"}, "ALP": {"off_policy_correction": "alp"}}
    experiment = {"kind": "train", "name": "f1", "recipe": "r.yaml", "methods": methods, "blowup_kl": 0.5}

    def check(verdict, match, **changes):
        path.write_text(
            yaml.safe_dump(
                {"model": "m", "seeds": [0], "experiments": [{**experiment, **changes, "verdict": verdict}]}
            )
        )
        if match is None:
            return study.load_grid(str(path))
        with pytest.raises(ValueError, match=match):
            study.load_grid(str(path))

    good = {"method": "ALP", "for_margin": 3, "runs": 8}
    assert check(good, None)["experiments"][0]["verdict"] == good
    check({"method": "ALP", "for_margin": 3}, r"experiments\[0\]\.verdict` must have exactly the keys")
    check({**good, "method": "Bypass"}, r"verdict`\.method got 'Bypass'; allowed values are \['ALP'\]")
    check({**good, "method": "GRPO"}, r"allowed values are \['ALP'\]")
    check({**good, "for_margin": 0}, r"verdict`\.for_margin must be a positive integer, got 0")
    check({**good, "runs": True}, r"verdict`\.runs must be a positive integer, got True")
    no_limits = {k: v for k, v in experiment.items() if k != "blowup_kl"}
    path.write_text(yaml.safe_dump({"model": "m", "seeds": [0], "experiments": [{**no_limits, "verdict": good}]}))
    with pytest.raises(ValueError, match="needs blow-up limits: set `blowup_kl` and/or `blowup_log_ratio`"):
        study.load_grid(str(path))
    check(good, "compares against a Bypass method", methods={"ALP": {}, "M": {}})
    check(good, r"experiments\[0\]\.blowup_kl` must be a positive number, got 0", blowup_kl=0)
    check(good, r"experiments\[0\]\.blowup_log_ratio` must be a positive number, got '15'", blowup_log_ratio="15")
    check(good, r"blowup_log_ratio` must be a positive number, got True", blowup_log_ratio=True)


def test_the_bypass_method_may_come_from_the_experiments_overrides():
    from alp_trl.study.grid import bypass_method

    assert (
        bypass_method({"methods": {"A": {"off_policy_correction": "alp"}, "B": {"off_policy_correction": "bypass"}}})
        == "B"
    )
    shared = {
        "overrides": {"off_policy_correction": "bypass"},
        "methods": {"A": {"off_policy_correction": "alp"}, "P": None},
    }
    assert bypass_method(shared) == "P"
    assert bypass_method({"methods": {"A": {}, "B": {"off_policy_correction": "seq_mis"}}}) is None
