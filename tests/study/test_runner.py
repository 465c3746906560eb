"""`alp_trl.study.runner`: every unit runs once, a failed one is recorded with its error (never dropped, never
stopping the others), and a second invocation runs only what has no result yet."""

import json

import yaml

from alp_trl.study import runner


def test_a_failed_unit_is_recorded_and_the_rest_run_once(tmp_path, monkeypatch):
    grid = {
        "model": "m",
        "seeds": [0, 1],
        "experiments": [{"kind": "train", "name": "t", "recipe": "r.yaml", "methods": {"A": {}, "B": {}}}],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    calls = []

    def fake_train(grid, experiment, unit, out_dir):
        calls.append(unit["id"])
        if unit["id"] == "t__B__seed0":
            raise RuntimeError("out of memory")
        return {"summary": {"steps": 3}}

    monkeypatch.setattr(runner, "run_train_unit", fake_train)
    out = tmp_path / "out"
    results = runner.run_study(str(path), str(out), only=None)
    ids = ["t__A__seed0", "t__B__seed0", "t__A__seed1", "t__B__seed1"]
    assert calls == ids and [r["unit"]["id"] for r in results["records"]] == ids
    assert [r["status"] for r in results["records"]] == ["ok", "failed", "ok", "ok"]
    failed = results["records"][1]
    assert failed["error"] == "RuntimeError: out of memory" and "fake_train" in failed["traceback"]
    assert results["records"][0]["result"] == {"summary": {"steps": 3}} and results["records"][0]["seconds"] >= 0
    stored = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in stored["records"]] == ["ok", "failed", "ok", "ok"]
    # a second invocation runs nothing that has a record (the failed one included: delete its file to rerun it)
    (out / "units" / "t__A__seed1.json").unlink()
    calls.clear()
    runner.run_study(str(path), str(out), only=None)
    assert calls == ["t__A__seed1"]
    # without their files the units are listed as not run, in the grid's order
    for unit in ("t__A__seed0", "t__B__seed1"):
        (out / "units" / f"{unit}.json").unlink()
    records = runner.load_records(str(out), [r["unit"] for r in results["records"]])
    assert [r["status"] for r in records] == ["not run", "failed", "ok", "not run"]
