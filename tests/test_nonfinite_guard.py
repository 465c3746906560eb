"""The non-finite step guard: a step with a NaN/inf loss or gradient never reaches the weights, sigma, the optimizer
state or the LR schedule; it is counted and described; consecutive failures stop training with a clear error."""

import inspect
import math
import re

import pytest
import torch
from transformers import Trainer, TrainerCallback

from alp_trl import ALPConfig, ALPGRPOTrainer
from alp_trl.nonfinite_guard import NonFiniteStepGuard, is_finite_number

from .doubles import poison_loss
from .helpers import build_trainer


class PoisonedTrainer(ALPGRPOTrainer):
    """Makes the loss of chosen (optimizer step, micro-step) pairs non-finite: its value (`"value"`, gradients stay
    finite) or its gradient (`"grad"`, the value stays finite)."""

    poison: dict = {}

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        micro = self._step % self.args.gradient_accumulation_steps
        kind = self.poison.get((self.state.global_step, micro)) or self.poison.get((self.state.global_step, "*"))
        return poison_loss(loss, kind)


class Snapshots(TrainerCallback):
    """After every optimizer step: the weights and sigma, AdamW's step counts and the learning rate."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        adam_steps = sorted({float(s["step"]) for s in optimizer.state.values() if "step" in s})
        self.steps.append({"params": params, "adam_steps": adam_steps, "lr": lr_scheduler.get_last_lr()[0]})


def _poisoned(make_model, tokenizer, dataset, train_args, poison, **overrides):
    args = ALPConfig(**{**train_args, "max_steps": 4, "lr_scheduler_type": "linear", **overrides})
    trainer = build_trainer(make_model(), tokenizer, dataset, args, trainer_class=PoisonedTrainer)
    trainer.poison = poison
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    return trainer, snapshots


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("kind", ["value", "grad"])
@pytest.mark.parametrize("correction", ["alp", "none"])
def test_nonfinite_micro_step_skips_the_whole_optimizer_step(
    make_model, tokenizer, prompt_dataset, train_args, caplog, kind, correction
):
    """Step 2's second micro-step is non-finite (its loss value, or only its gradient as with cuDNN's NaN backward):
    step 2 changes nothing (weights, sigma, AdamW state, learning rate), is counted and logged with its micro-batches;
    steps 3-4 train normally."""
    trainer, snaps = _poisoned(
        make_model,
        tokenizer,
        prompt_dataset,
        train_args,
        {(1, 1): kind},
        off_policy_correction=correction,
        gradient_accumulation_steps=2,
        perturb_sigma_init=0.05,
        perturb_lr=0.1,
    )
    with caplog.at_level("WARNING", logger="alp_trl.trainer"):
        trainer.train()
    first, skipped, third, fourth = snaps.steps
    assert _same(skipped["params"], first["params"]), "the non-finite step left every parameter as it was"
    assert skipped["adam_steps"] == first["adam_steps"] == [1.0], "AdamW did not step"
    assert skipped["lr"] == first["lr"], "the LR scheduler did not step"
    assert not _same(third["params"], skipped["params"]) and third["adam_steps"] == [2.0], "training continues"
    assert third["lr"] < skipped["lr"] and fourth["adam_steps"] == [3.0]
    if correction == "alp":
        sigma = "alp_perturbation.log_sigma"
        assert torch.equal(skipped["params"][sigma], first["params"][sigma])
        assert not torch.equal(third["params"][sigma], skipped["params"][sigma]), "sigma trains again"
    assert all(math.isfinite(p.abs().sum().item()) for p in trainer.model.parameters())

    logged = [r["train/nonfinite_steps"] for r in trainer.state.log_history if "grad_norm" in r]
    assert logged == [0.0, 1.0, 1.0, 1.0]
    grad_norms = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    assert math.isnan(grad_norms[1]) == (kind == "grad") and all(math.isfinite(g) for g in grad_norms[::2])
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert message.startswith("Optimizer step 2 skipped")
    # both micro-batches of the window, with their completion-token counts; the poisoned one flagged by its loss
    tokens = [int(t) for t in re.findall(r"micro-batch \d: (\d+) completion tokens", message)]
    assert len(tokens) == 2 and all(0 < t <= 4 * 8 for t in tokens)
    assert ("micro-batch 1" in message and "non-finite loss" in message) == (kind == "value")


def test_consecutive_nonfinite_steps_stop_training_with_the_causes(make_model, tokenizer, prompt_dataset, train_args):
    trainer, snaps = _poisoned(
        make_model,
        tokenizer,
        prompt_dataset,
        train_args,
        {(0, "*"): "grad", (1, "*"): "grad"},
        max_consecutive_nonfinite_steps=2,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row \(up to step 2\)") as error:
        trainer.train()
    assert "cudnn_sdpa_backward" in str(error.value) and "pytorch/pytorch#196678" in str(error.value)
    assert len(snaps.steps) == 1, "stopped at the second step, before its end"
    assert _same(before, {n: p.detach() for n, p in trainer.model.named_parameters()}), "nothing was ever applied"


def test_guard_unit_counts_describes_and_stops():
    guard = NonFiniteStepGuard(max_consecutive=2)
    guard.record(torch.tensor(0.5), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    guard.record(torch.tensor(float("inf")), torch.tensor([[1, 1, 1]]))
    assert guard.local_loss_is_nonfinite().item() == 1.0
    message = guard.conclude(True, step=7, grad_norm=float("nan"), rank=1)
    assert "step 7 skipped (non-finite gradient norm (nan))" in message and "Rank 1" in message
    assert "micro-batch 0: 3 completion tokens, loss 0.5;" in message
    assert "micro-batch 1: 3 completion tokens, loss inf <- non-finite loss" in message
    assert guard.window == [] and (guard.total_skipped, guard.consecutive) == (1, 1)
    guard.record(torch.tensor(0.1))
    assert guard.local_loss_is_nonfinite().item() == 0.0
    assert guard.conclude(False, step=8, grad_norm=torch.tensor(2.0)) is None
    assert (guard.total_skipped, guard.consecutive) == (1, 0), "a good step resets the run of failures"
    assert guard.conclude(True, step=9, grad_norm=1.0) is not None
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row"):
        guard.conclude(True, step=10, grad_norm=float("inf"))
    assert guard.total_skipped == 3
    assert [is_finite_number(v) for v in (None, 1.0, torch.tensor(float("nan")), float("-inf"))] == [
        True,
        True,
        False,
        False,
    ]


def test_trainer_internals_the_guard_relies_on():
    """The guard runs inside Trainer's `_get_grad_norm` right before `optimizer.step()` and marks the step skipped
    through accelerate's `AcceleratedOptimizer._is_overflow` (which keeps Trainer from stepping the LR scheduler).
    If transformers or accelerate change either, this fails loudly."""
    from accelerate.optimizer import AcceleratedOptimizer

    source = inspect.getsource(Trainer._run_epoch)  # the micro-step / optimizer-step loop
    norm, step, scheduler = (
        source.index("self._get_grad_norm(model"),
        source.index("self.optimizer.step()"),
        source.index("if not self.accelerator.optimizer_step_was_skipped:"),
    )
    assert norm < step < scheduler
    optimizer = AcceleratedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    assert optimizer.step_was_skipped is False
    optimizer._is_overflow = True
    assert optimizer.step_was_skipped is True
