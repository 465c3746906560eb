"""Training curves (`alp_trl.plots`): the PNG, the panels, and the history read back from the metrics log or the
newest checkpoint. (The callback that writes the metrics log: tests/test_callbacks.py.)"""

import json

import pytest

from alp_trl.callbacks import METRICS_FILE
from alp_trl.plots import load_history, metric_series, plot_training_curves


def _history(steps=5):
    return [
        {
            "step": s,
            "reward": 0.1 * s,
            "rewards/accuracy/mean": 0.05 * s,
            "alp/train_rollout_kl": 0.01 / s,
            "alp/ratio/p50": 1.0,
            "alp/ratio/p99": 1.0 + 0.1 * s,
            "alp/ratio/max": 2.0,
            "alp/clip_frac": 0.02,
            "entropy": 2.0 - 0.1 * s,
            "alp/sigma/layer_00": 0.02,
            "alp/sigma/layer_01": 0.02 + 0.001 * s,
        }
        for s in range(1, steps + 1)
    ]


def test_plot_writes_a_png(tmp_path):
    paths = plot_training_curves(_history(), str(tmp_path), title="run")
    assert len(paths) == 1
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_history_falls_back_to_the_newest_checkpoint(tmp_path):
    for step in (2, 10):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": _history(step)}))
    assert len(load_history(str(tmp_path))) == 10
    with pytest.raises(FileNotFoundError, match=METRICS_FILE):
        load_history(str(tmp_path / "nothing"))


def test_tool_use_noise_survival_and_weight_panels():
    from alp_trl.plots import panel_keys

    history = [
        {"step": 1, "reward": 0.1, "tools/calls_per_completion": 1.0, "tools/failures/timeout": 0.25},
        {"step": 2, "reward": 0.2, "alp/noise_survival": 0.97, "alp/is_weight_chi2": 0.01},
    ]
    keys = panel_keys(history)
    assert keys["tool use (code_tool)"] == ["tools/calls_per_completion", "tools/failures/timeout"]
    assert keys["noise survival (ALP)"] == ["alp/noise_survival"]
    assert keys["importance weights (train / rollout)"] == ["alp/is_weight_chi2"]
    assert keys["entropy"] == []


def test_metric_series_keeps_the_numbers_of_one_metric():
    history = [
        {"step": 1, "reward": 0.5},
        {"step": 2, "reward": None},
        {"step": 3, "reward": True},
        {"step": 4, "loss": 1.0},
        {"step": 5, "reward": 2},
    ]
    assert metric_series(history, "reward") == ([1, 5], [0.5, 2.0]), "None and booleans are not values"
