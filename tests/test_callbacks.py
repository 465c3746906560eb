"""The trainer callbacks (`alp_trl.callbacks`): the metrics log that survives interruption, in-training avg@k, and
problems dealt out evenly over ranks."""

from types import SimpleNamespace

import pytest

from alp_trl.callbacks import MetricsJsonlCallback
from alp_trl.evaluate import load_problems
from alp_trl.plots import load_history


def test_in_training_avg_at_k_is_logged(make_model, tokenizer, prompt_dataset, train_args):
    from alp_trl import ALPConfig
    from alp_trl.callbacks import AvgAtKCallback

    from .helpers import build_trainer

    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args))
    problems = [{**p, "prompt_text": p["problem"]} for p in load_problems("arithmetic", 2)]
    callback = AvgAtKCallback(trainer, problems, k=2, temperature=1.0, max_new_tokens=4, every=1, batch_size=4)
    trainer.add_callback(callback)
    noise_calls = trainer.perturbation.num_noise_calls
    summary = callback.evaluate()
    assert summary["problems"] == 2 and 0.0 <= summary["avg@2"] <= 1.0
    assert trainer.perturbation.num_noise_calls == noise_calls, "evaluated without the perturbation"
    trainer.train()
    logged = [r for r in trainer.state.log_history if "eval/avg@2" in r]
    assert len(logged) == 2 and all(0.0 <= r["eval/pass@2"] <= 1.0 for r in logged)
    # evaluating does not change training: the same run without the callback logs the same losses
    plain = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args))
    plain.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses == [r["loss"] for r in plain.state.log_history if "loss" in r] and len(losses) == 2


@pytest.mark.parametrize("num_items, world_size", [(3, 2), (4, 2), (5, 3), (2, 4), (7, 1)])
def test_problems_are_dealt_out_evenly_over_ranks(num_items, world_size):
    from alp_trl.callbacks import rank_share

    shares = [rank_share(num_items, rank, world_size) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1, "every rank runs the same number of generations"
    real = sorted(i for share in shares for i in share if i < num_items)
    assert real == list(range(num_items)), "each problem is graded exactly once"


def _state(step, zero=True):
    return SimpleNamespace(global_step=step, epoch=step / 10, is_world_process_zero=zero)


def test_metrics_log_is_appended_as_it_goes_and_trimmed_on_resume(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback = MetricsJsonlCallback()
    callback.on_train_begin(args, _state(0), None)
    for step in (1, 2, 3):
        callback.on_log(args, _state(step), None, logs={"reward": float(step), "bad": float("nan")})
    callback.on_log(args, _state(4, zero=False), None, logs={"reward": 4.0})  # other ranks write nothing
    assert [r["step"] for r in load_history(str(tmp_path))] == [1, 2, 3]
    assert load_history(str(tmp_path))[0]["bad"] is None
    callback.on_train_begin(args, _state(2), None)  # resumed from checkpoint-2: steps after it are dropped
    assert [r["step"] for r in load_history(str(tmp_path))] == [1, 2]
