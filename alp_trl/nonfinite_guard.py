"""Keep non-finite optimizer steps away from the weights.

One NaN gradient written into the weights by the optimizer poisons every later forward pass: the next generation
samples from a NaN distribution and dies in a device-side assert, long after the cause. `NonFiniteStepGuard` holds
the bookkeeping of the guard `ALPGRPOTrainer` runs at every optimizer step:

- each micro-step of the accumulation window records its loss and its completion-token count;
- at the optimizer step, the step is skipped when its gradient norm or any micro-step's loss is NaN/inf on any rank
  (the trainer reduces the flag over the ranks, so all of them skip together);
- a skipped step is counted and described (which micro-batches, how many tokens, their losses), and after
  `max_consecutive` skipped steps in a row training stops with an error that names the likely causes.

The trainer does the skipping itself (gradients dropped, optimizer and LR scheduler not stepped); this module only
decides and describes, so it is tested without a model.
"""

import logging
import math
from dataclasses import dataclass, field

import torch

from .attention_backend import CUDNN_SDPA_BUG


logger = logging.getLogger(__name__)


@dataclass
class MicroStep:
    """What one micro-step of the current accumulation window left behind (tensors, read only on a skip)."""

    loss: torch.Tensor
    tokens: torch.Tensor | None = None


def is_finite_number(value) -> bool:
    """`True` for a finite float / 0-d tensor; `None` (no gradient norm computed) counts as finite."""
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


def likely_causes() -> str:
    """The causes of a non-finite step, most likely first, with what to change."""
    return (
        "Likely causes: (1) PyTorch's cuDNN attention backward on H100/H200 with torch >= 2.11 returns NaN gradients "
        f"for padded batches ({CUDNN_SDPA_BUG}): keep cudnn_sdpa_backward='auto' or set it to 'off', or use "
        "attn_implementation='eager'; (2) a learning rate too high for the model, or fp16 overflow (use bf16, lower "
        "learning_rate / perturb_lr, keep max_grad_norm > 0); (3) NaN or inf in the data or the rewards (a reward "
        "function returning inf or NaN, an empty completion mask); (4) weights that are already non-finite (a "
        "checkpoint saved after a bad step)."
    )


@dataclass
class NonFiniteStepGuard:
    """Counts and describes skipped optimizer steps; stops training after `max_consecutive` in a row."""

    max_consecutive: int = 3
    total_skipped: int = 0
    consecutive: int = 0
    window: list[MicroStep] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.max_consecutive, int) or self.max_consecutive < 1:
            raise ValueError(
                f"`max_consecutive_nonfinite_steps` must be an integer >= 1, got {self.max_consecutive!r}."
            )

    def record(self, loss: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Remember one micro-step's (detached) loss and completion-token count; no device sync."""
        self.window.append(MicroStep(loss.detach().reshape(()), None if tokens is None else tokens.detach()))

    def local_loss_is_nonfinite(self, device=None) -> torch.Tensor:
        """A 0-d float tensor: 1 if a micro-step loss of this rank's window is NaN/inf, else 0 (no device sync)."""
        if not self.window:
            return torch.zeros((), device=device)
        losses = torch.stack(
            [m.loss.float().to(device) if device is not None else m.loss.float() for m in self.window]
        )
        return (~torch.isfinite(losses)).any().float()

    def describe_window(self) -> str:
        """One line per micro-batch of the window: index, completion tokens, loss (reads the tensors: a sync)."""
        parts = []
        for index, micro in enumerate(self.window):
            loss = micro.loss.float().item()
            tokens = "?" if micro.tokens is None else int(micro.tokens.sum().item())
            flag = "" if math.isfinite(loss) else " <- non-finite loss"
            parts.append(f"micro-batch {index}: {tokens} completion tokens, loss {loss:.6g}{flag}")
        return "; ".join(parts) if parts else "no micro-batch recorded"

    def conclude(self, skipped: bool, step: int, grad_norm, rank: int = 0) -> str | None:
        """Close the accumulation window of optimizer step `step`.

        Returns the warning to log when the step was skipped (`None` otherwise) and raises `RuntimeError` once
        `max_consecutive` steps in a row were skipped. The window is cleared either way.
        """
        try:
            if not skipped:
                self.consecutive = 0
                return None
            self.total_skipped += 1
            self.consecutive += 1
            what = (
                f"non-finite gradient norm ({float(grad_norm)})"
                if not is_finite_number(grad_norm)
                else "a non-finite loss on some rank"
            )
            message = (
                f"Optimizer step {step} skipped ({what}): gradients dropped, weights, sigma, optimizer state and "
                f"learning-rate schedule unchanged. Rank {rank}'s micro-batches: {self.describe_window()}. "
                f"{self.total_skipped} step(s) skipped so far, {self.consecutive} in a row "
                f"(training stops at {self.max_consecutive})."
            )
            if self.consecutive >= self.max_consecutive:
                raise RuntimeError(
                    f"Training stopped: {self.consecutive} optimizer steps in a row (up to step {step}) had a "
                    f"non-finite loss or gradient norm, so none of them reached the weights. Last: {message} "
                    f"{likely_causes()} Raise max_consecutive_nonfinite_steps to tolerate more."
                )
            return message
        finally:
            self.window.clear()


def drop_optimizer_step(optimizer, skip: bool) -> None:
    """Make `optimizer.step()` and the LR scheduler a no-op for this step when `skip` (torch optimizers skip
    parameters without a gradient; accelerate's `step_was_skipped` keeps Trainer from stepping the scheduler).
    Under fp16 loss scaling the gradients are poisoned instead, so that the scaler skips (and reports) it."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None:
        if skip:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.fill_(float("nan"))
        return
    if not hasattr(optimizer, "_is_overflow"):
        raise RuntimeError(
            f"The non-finite step guard expects accelerate's AcceleratedOptimizer (`_is_overflow`), got "
            f"{type(optimizer).__name__}: accelerate changed; see alp_trl/nonfinite_guard.py `drop_optimizer_step`."
        )
    if skip:
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
    optimizer._is_overflow = skip


def guard_optimizer_step(guard: NonFiniteStepGuard, accelerator, optimizer, grad_norm, step: int) -> bool:
    """The guard at an optimizer step (`step`, 1-based), right before `optimizer.step()`: skip the step on every rank
    if its gradient norm or a micro-step loss is NaN/inf on any rank. Returns whether the step was skipped."""
    device = accelerator.device
    local_bad = guard.local_loss_is_nonfinite(device)
    if not is_finite_number(grad_norm):
        local_bad = torch.ones((), device=device)
    skipped = bool(accelerator.reduce(local_bad, reduction="sum").item() > 0)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        # DeepSpeed has already stepped inside `backward`. With bf16 it checks the gradients for overflow itself
        # (`bf16.check_grad_overflow`, on by default) and skips the step, which it reports here; a non-finite loss
        # whose gradients are finite is stepped.
        deepspeed_skipped = accelerator.optimizer_step_was_skipped
        if skipped and not deepspeed_skipped:
            logger.error(
                "Optimizer step %d: non-finite loss or gradient norm, but DeepSpeed stepped anyway (its overflow check "
                "saw finite gradients or is off: set `bf16.check_grad_overflow: true`).",
                step,
            )
        skipped = deepspeed_skipped
    else:
        drop_optimizer_step(optimizer, skipped)
    message = guard.conclude(skipped, step, grad_norm, rank=accelerator.process_index)
    if message:
        logger.warning(message)
    return skipped
