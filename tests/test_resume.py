"""Checkpoints and resume: an interrupted run resumed from its checkpoint matches an uninterrupted one."""

import os

import pytest
import torch
from transformers import TrainerCallback

from alp_trl import ALPConfig
from alp_trl.train import last_checkpoint

from .conftest import alp_trainer


class StopAfter(TrainerCallback):
    """Interrupt training after `step` (after its checkpoint was written), as a crash would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _run(make_model, tokenizer, prompt_dataset, output_dir, callbacks=(), resume=None, **extra):
    args = ALPConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=4,
        learning_rate=1e-2,
        perturb_sigma_init=0.05,
        perturb_lr=0.05,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        **extra,
    )
    trainer = alp_trainer(
        make_model(),
        tokenizer,
        prompt_dataset,
        args,
        callbacks=list(callbacks),
    )
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


def test_incomplete_checkpoints_are_skipped(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), "checkpoint-4")
    assert last_checkpoint(str(tmp_path / "missing")) is None
