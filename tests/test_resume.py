"""Checkpoints and resume: an interrupted run resumed from its checkpoint matches an uninterrupted one."""

import pytest
import torch
from transformers import TrainerCallback

from alp_trl.train import last_checkpoint

from .helpers import build_trainer, tiny_config


class StopAfter(TrainerCallback):
    """Interrupt training after `step` (after its checkpoint was written), as a crash would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _run(make_model, tokenizer, prompt_dataset, output_dir, callbacks=(), resume=None, **extra):
    args = tiny_config(
        output_dir,
        max_steps=4,
        perturb_sigma_init=0.05,
        perturb_lr=0.05,
        save_strategy="steps",
        save_steps=2,
        **extra,
    )
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    return trainer, losses


@pytest.mark.parametrize(("level", "accumulation"), [("token", 1), ("sequence", 1), ("token", 2)])
def test_resumed_run_matches_the_uninterrupted_run(
    tmp_path, make_model, tokenizer, prompt_dataset, level, accumulation
):
    """Also with 2 micro-steps per optimizer step: checkpoints fall on window boundaries, and the noise key
    (optimizer step, micro-step in the window) survives the resume although TRL's micro-step counter restarts."""
    extra = {"importance_sampling_level": level, "gradient_accumulation_steps": accumulation}
    straight, straight_losses = _run(make_model, tokenizer, prompt_dataset, str(tmp_path / "a"), **extra)
    interrupted_dir = str(tmp_path / "b")
    _, first_losses = _run(
        make_model,
        tokenizer,
        prompt_dataset,
        interrupted_dir,
        callbacks=[StopAfter(2)],
        **extra,
    )
    assert sorted(first_losses) == [1, 2]
    checkpoint = last_checkpoint(interrupted_dir)
    assert checkpoint.endswith("checkpoint-2")
    resumed, resumed_losses = _run(make_model, tokenizer, prompt_dataset, interrupted_dir, resume=checkpoint, **extra)
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-5, abs=1e-7), step
    torch.testing.assert_close(resumed.perturbation.sigma, straight.perturbation.sigma, rtol=1e-5, atol=1e-8)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
