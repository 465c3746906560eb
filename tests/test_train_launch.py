"""The one launcher of training runs (`alp_trl.train_launch`), shared by `alp-trl compare` and `alp-trl study`."""

import os
import subprocess
import sys

import pytest

from alp_trl import train_launch
from alp_trl.train_launch import TrainingRun, launch_training_run, metrics_path, train_command


def test_the_command_and_the_metrics_path_by_value(tmp_path):
    out = str(tmp_path / "run")
    command = train_command("r.yaml", out, ["--seed", "0"], leading_args=["--model_name_or_path", "m"])
    assert command == [
        sys.executable,
        "-m",
        "alp_trl.train",
        "--config",
        "r.yaml",
        "--model_name_or_path",
        "m",
        "--output_dir",
        out,
        "--seed",
        "0",
    ]
    assert metrics_path(out) == os.path.join(out, "metrics.jsonl")


def test_a_launch_removes_the_stale_metrics_log_and_records_the_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs, (out / "metrics.jsonl").exists()))
        return subprocess.CompletedProcess(command, 3, stdout="", stderr="boom")

    monkeypatch.setattr(train_launch.subprocess, "run", fake_run)
    run = launch_training_run("r.yaml", str(out), ["--seed", "1"], capture_output=True, log_prefix="[x] ")
    expected = [sys.executable, "-m", "alp_trl.train", "--config", "r.yaml", "--output_dir", str(out), "--seed", "1"]
    assert calls == [(expected, {"capture_output": True, "text": True, "check": False}, False)], "removed first"
    assert isinstance(run, TrainingRun) and run.seconds >= 0
    assert (run.command, run.output_dir, run.returncode, run.stderr) == (expected, str(out), 3, "boom")
    assert run.metrics_path == str(out / "metrics.jsonl")
    assert run.logged_command == f"alp_trl.train --config r.yaml --output_dir {out} --seed 1"
    assert capsys.readouterr().out == f"[x] {run.logged_command}\n", "announced before it starts"


def test_a_checked_launch_raises_on_failure_and_streams_its_output(tmp_path, monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen.update(kwargs)
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(train_launch.subprocess, "run", fake_run)
    with pytest.raises(subprocess.CalledProcessError):
        launch_training_run("r.yaml", str(tmp_path / "run"), check=True)
    assert seen == {"capture_output": False, "text": False, "check": True}
