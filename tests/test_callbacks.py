"""The trainer callbacks (`alp_trl.callbacks`): in-training avg@k, and problems dealt out evenly over ranks."""

import pytest

from alp_trl.evaluate import load_problems


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
