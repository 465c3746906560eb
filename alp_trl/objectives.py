"""The ALP objective and the off-policy baselines as pure tensor functions (no trainer state).

Shapes: `logps`, `denom_logps`, `mask` are `(B, T)` over completion tokens; `advantages` is `(B, 1)` or `(B, T)`.
Token-level quantities are `(B, T)`. Sequence-level ratios are broadcast to `(B, T)` with the GSPO stop-gradient trick
(value of the sequence ratio, gradient through each token's own log-prob), so that every loss type aggregates them
like token-level ones.
"""

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (all of them, or along `dim`); 0 where nothing is masked in."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def sequence_log_ratio(token_log_ratio: torch.Tensor, mask: torch.Tensor, aggregation: str = "mean") -> torch.Tensor:
    """`(B, 1)` sequence log-ratio: masked mean (geometric-mean ratio, GSPO) or sum (full likelihood ratio)."""
    if aggregation == "mean":
        return masked_mean(token_log_ratio, mask, dim=-1).unsqueeze(-1)
    if aggregation == "sum":
        return (token_log_ratio * mask.to(token_log_ratio.dtype)).sum(-1, keepdim=True)
    raise ValueError(f"Unknown sequence ratio aggregation {aggregation!r}; allowed values are ['mean', 'sum'].")


def importance_log_ratio(
    logps: torch.Tensor,
    denom_logps: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    aggregation: str = "mean",
    clamp: float = 20.0,
) -> torch.Tensor:
    """
    Per-token log importance ratio `log(pi(y_t) / pi_denom(y_t))` of shape `(B, T)`, clamped to `[-clamp, clamp]`.

    With `level="sequence"` every token carries the sequence log-ratio (mean or sum of the token log-ratios) as its
    value, while its gradient is that of its own log-prob (GSPO's `sg[s] * pi / sg[pi]`); a clamped sequence passes no
    gradient, like a clamped token. `denom_logps` is treated as a constant.
    """
    token_lr = logps - denom_logps.detach()
    if level == "token":
        return token_lr.clamp(-clamp, clamp)
    if level == "sequence":
        seq_lr = sequence_log_ratio(token_lr, mask, aggregation)
        inside = (seq_lr.abs() <= clamp).to(logps.dtype)
        return seq_lr.detach().clamp(-clamp, clamp) + inside * (logps - logps.detach())
    raise ValueError(f"Unknown importance sampling level {level!r}; allowed values are ['token', 'sequence'].")


def kl_correction_weight(
    logps: torch.Tensor,
    denom_logps: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    aggregation: str = "mean",
    clamp: float = 20.0,
) -> torch.Tensor:
    """
    Importance weight of the KL-to-reference term (TRL's `use_bias_correction_kl`): the token ratio `(B, T)`, or at
    sequence level the sequence ratio `(B, 1)` with its full gradient (as TRL broadcasts it onto the per-token KL).
    """
    token_lr = logps - denom_logps.detach()
    if level == "sequence":
        return torch.exp(sequence_log_ratio(token_lr, mask, aggregation).clamp(-clamp, clamp))
    return torch.exp(token_lr.clamp(-clamp, clamp))


@dataclass
class SurrogateOutput:
    """Per-token loss of the clipped surrogate and where each clip was active (boolean `(B, T)` tensors)."""

    per_token_loss: torch.Tensor
    ratio: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    dual_clipped: torch.Tensor


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip_c: float | None = None,
    delta: float | None = None,
) -> SurrogateOutput:
    """
    PPO clipped surrogate loss `-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)` per token, with

    - `delta` (TRL's two-sided clipping): the unclipped branch uses `min(r, delta)`;
    - `dual_clip_c` (dual clip, Ye et al. 2020): for `A < 0` the loss is capped at `-c A`, so a huge ratio on a
      negative-advantage token can neither blow up the loss nor pass a gradient.
    """
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    per_token_loss = torch.maximum(-unclipped * advantages, -clipped * advantages)
    negative = advantages < 0
    if dual_clip_c is not None:
        dual_cap = -dual_clip_c * advantages
        dual_clipped = negative & (per_token_loss > dual_cap)
        per_token_loss = torch.where(negative, torch.minimum(per_token_loss, dual_cap), per_token_loss)
    else:
        dual_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    low_clipped = (ratio < 1.0 - epsilon_low) & negative
    high_clipped = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    return SurrogateOutput(per_token_loss, ratio, low_clipped, high_clipped, dual_clipped.expand_as(ratio))


@torch.no_grad()
def rollout_correction_weight(
    old_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    threshold: float = 3.0,
    mode: str = "mask",
    clamp: float = 20.0,
) -> torch.Tensor:
    """
    Detached auxiliary weight `w = pi_old / pi_rollout` of the MIS / TIS baselines, `(B, T)` or `(B, 1)`.

    `level="sequence"` uses the product of the token ratios over the completion. `mode="mask"` (MIS) zeroes weights
    outside `[1/threshold, threshold]`; `mode="truncate"` (TIS) caps them at `threshold`. Tokens whose rollout log-prob
    is NaN count as ratio 1.
    """
    log_w = torch.nan_to_num(old_logps - rollout_logps, nan=0.0) * mask.to(old_logps.dtype)
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True)
    elif level != "token":
        raise ValueError(f"Unknown level {level!r}; allowed values are ['token', 'sequence'].")
    w = torch.exp(log_w.clamp(-clamp, clamp))
    if mode == "truncate":
        return w.clamp(max=threshold)
    if mode == "mask":
        keep = (w >= 1.0 / threshold) & (w <= threshold)
        return w * keep.to(w.dtype)
    raise ValueError(f"Unknown mode {mode!r}; allowed values are ['mask', 'truncate'].")


def low_variance_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) on samples of pi: `exp(ref - logp) - (ref - logp) - 1`."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Reduce a `(B, T)` per-token loss to a scalar the way TRL's `GRPOTrainer` does for `loss_type`:

    - `grpo`: mean over sequences of the per-sequence token mean;
    - `bnpo`: token mean over the (local) batch;
    - `dr_grpo`: token sum over `B * max_completion_length`;
    - `dapo`: token sum over `num_items` (the global token count of one accumulation window, per process);
    - `luspo`: mean over sequences of the per-sequence token sum.

    Gradient-accumulation scaling is left to the caller.
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length.")
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        if num_items is None:
            raise ValueError("loss_type='dapo' needs num_items.")
        return masked.sum() / num_items
    if loss_type == "luspo":
        return masked.sum(-1).mean()
    raise ValueError(
        f"Unknown loss type {loss_type!r}; allowed values are ['grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo']."
    )
