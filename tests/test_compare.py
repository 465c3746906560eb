"""`alp-trl compare` (`alp_trl.compare`): one run per method through the shared launcher, then a table, a plot and the
histories; by hand with a fake launcher, and end to end with real training runs (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alp_trl import compare, train_launch

from .helpers import write_tiny_recipe


REPO = Path(__file__).resolve().parents[1]


def _history(reward_scale: float) -> list[dict]:
    return [
        {"step": step, "reward": reward_scale * step, "alp/train_rollout_kl": 0.01 * step, "step_time": 2.0}
        for step in (1, 2, 3, 4)
    ]


def test_reduce_and_table_by_hand():
    history = _history(0.1)
    assert compare.reduce(history, "reward", "late_mean") == pytest.approx(0.35)  # steps 3 and 4
    assert compare.reduce(history, "alp/train_rollout_kl", "max") == pytest.approx(0.04)
    assert compare.reduce(history, "alp/train_rollout_kl", "mean") == pytest.approx(0.025)
    assert compare.reduce(history, "alp/ratio/p99", "mean") is None
    lines = compare.table({"ALP (token)": history}).splitlines()
    assert lines[0] == "| method | " + " | ".join(compare.COLUMNS) + " |"
    assert lines[2] == "| ALP (token) | 0.35 | n/a | 0.025 | n/a | n/a | n/a | n/a | 2 |"
    assert compare._slug("ALP (seq)") == "alp_seq" and compare._slug("GRPO (TRL)") == "grpo_trl"


def test_each_method_is_launched_with_its_flags_and_tabulated(tmp_path, monkeypatch, capsys):
    commands = []

    def fake_run(command, **kwargs):  # a "training run" that logs a history into its output_dir
        commands.append(command)
        out = command[command.index("--output_dir") + 1]
        scale = 0.1 if "alp" in command else 0.2
        os.makedirs(out, exist_ok=True)
        with open(train_launch.metrics_path(out), "w") as f:
            f.write("\n".join(json.dumps(r) for r in _history(scale)))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(train_launch.subprocess, "run", fake_run)
    out = tmp_path / "compare"
    histories = compare.main(
        [
            "--recipe",
            "r.yaml",
            "--out",
            str(out),
            "--methods",
            "ALP (token)",
            "GRPO",
            "--max-steps",
            "4",
            "--",
            "--x",
            "1",
        ]
    )
    shared = ["--max_steps", "4", "--seed", "42", "--rollout_mismatch", "bf16", "--rollout_mismatch_std", "0.0"]
    shared += ["--save_strategy", "no", "--auto_resume", "false", "--plot", "false", "--x", "1"]
    head = [sys.executable, "-m", "alp_trl.train", "--config", "r.yaml"]
    assert commands == [
        [*head, "--off_policy_correction", "alp", "--output_dir", str(out / "alp_token"), *shared],
        [*head, "--off_policy_correction", "ppo", "--output_dir", str(out / "grpo"), *shared],
    ]
    assert list(histories) == ["ALP (token)", "GRPO"] and histories["GRPO"] == _history(0.2)
    printed = capsys.readouterr().out
    assert f"[compare] GRPO: {' '.join(commands[1][2:])}\n" in printed
    rows = (out / "compare.md").read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["ALP (token)", "GRPO"]
    saved = json.loads((out / "compare.json").read_text())
    assert set(saved["seconds"]) == {"ALP (token)", "GRPO"} and saved["histories"]["ALP (token)"] == _history(0.1)
    assert (out / "compare.png").stat().st_size > 10_000


@pytest.mark.slow
def test_compare_runs_the_new_modes_and_tabulates_every_method(tmp_path, tiny_run_assets, monkeypatch):
    """`alp-trl compare` with the new correction modes: one run per method through the entry point, a table row per
    method with the reward and the train-rollout KL read from its metrics."""
    model_dir, data = tiny_run_assets
    path = write_tiny_recipe(tmp_path, model_dir, data, bf16=False, use_cpu=True, logging_steps=1)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    histories = compare.main(
        [
            "--recipe",
            str(path),
            "--out",
            str(tmp_path / "compare"),
            "--methods",
            "Seq-TIS",
            "GRPO",
            "GRPO (TRL)",
            "--max-steps",
            "1",
        ]
    )
    assert set(histories) == {"Seq-TIS", "GRPO", "GRPO (TRL)"}
    assert {p.name for p in (tmp_path / "compare").iterdir() if p.is_dir()} == {"seq_tis", "grpo", "grpo_trl"}
    table = (tmp_path / "compare" / "compare.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == set(histories)
    assert "n/a" not in rows["Seq-TIS"].split("|")[5], "the train-rollout KL column is filled"
    assert 0.0 <= histories["Seq-TIS"][0]["alp/tis_truncated_frac"] <= 1.0
    assert histories["GRPO (TRL)"][0]["rollout_mismatch/kl_k3"] > 0, "metrics-only mode of plain GRPO measures it"
