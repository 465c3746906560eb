"""`alp_trl.study.intervention_units`: the one-step intervention grid on the tiny model (Figure 2), its rollout cache
and the matched-size Bypass interpolation."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from alp_trl import study
from alp_trl.intervention import RolloutBatch

from .grids import intervention_grid


def test_intervention_grid_runs_resumes_and_reports(tmp_path, saved_model_dir):
    grid = intervention_grid(tmp_path, saved_model_dir)
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
    grid_path = intervention_grid(tmp_path, saved_model_dir)
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


def test_matched_bypass_interpolates_as_a_power_law():
    points = [
        {"update_size_kl": 1e-4, "vs_rollout": {"kl_k3": 0.01}},
        {"update_size_kl": 1e-2, "vs_rollout": {"kl_k3": 0.03}},
    ]
    assert study.matched_bypass(points, 1e-3) == pytest.approx(0.01 * 3**0.5)
    proportional = [{"update_size_kl": x, "vs_rollout": {"kl_k3": 2 * x}} for x in (0.002, 0.01)]
    assert study.matched_bypass(proportional, 0.0067) == pytest.approx(0.0134), "y = 2x is interpolated exactly"
    assert study.matched_bypass(points, 1e-1) is None and study.matched_bypass(points, 1e-5) is None
