"""The ALP objective and the off-policy baselines as pure tensor functions (no trainer state).

Shapes: `logps`, `denom_logps`, `mask` are `(B, T)` over completion tokens; `advantages` is `(B, 1)` or `(B, T)`.
Token-level quantities are `(B, T)`. Sequence-level ratios are broadcast to `(B, T)` with the GSPO stop-gradient trick
(value of the sequence ratio, gradient through each token's own log-prob), so that every loss type aggregates them
like token-level ones.
"""

import math
from dataclasses import dataclass

import torch

from .corrections import Correction, correction


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


def _no_flags(ratio: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(ratio, dtype=torch.bool)


def cispo_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor, max_ratio: float
) -> SurrogateOutput:
    """
    CISPO (MiniMax-M1): `-sg[min(r, max_ratio)] A log pi` per token. The importance weight is truncated and detached;
    the gradient flows through `logps` only, so no token is ever dropped. `high_clipped` marks positive-advantage
    tokens whose weight was truncated (TRL's `cispo_clip_ratio`).
    """
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=max_ratio).detach()
    per_token_loss = -weight * advantages * logps
    high = ((ratio > max_ratio) & (advantages > 0)).expand_as(per_token_loss)
    flags = _no_flags(per_token_loss)
    return SurrogateOutput(per_token_loss, ratio.expand_as(per_token_loss), flags, high, flags)


def sapo_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> SurrogateOutput:
    """
    SAPO: a soft gate in place of the hard clip, `-sigmoid(tau (r - 1)) * 4 / tau * A` per token, with temperature
    `tau = temperature_pos` for `A > 0` and `temperature_neg` otherwise (its slope at `r = 1` is 1, like `r A`).
    """
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg).to(ratio.dtype)
    per_token_loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    flags = _no_flags(per_token_loss)
    return SurrogateOutput(per_token_loss, ratio.expand_as(per_token_loss), flags, flags, flags)


@torch.no_grad()
def vespo_gamma_weight(
    token_log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> torch.Tensor:
    """
    VESPO's detached gamma weight `phi(w) = exp(lambda) w^k exp(-lambda w)` (so `phi(1) = 1`) of the sequence ratio
    `w = exp(sum_t log r_t)` (token log-ratios clamped to [-20, 20], `log w` to [log 1e-8, 20]), with `(k, lambda)`
    by the sign of the advantage. `(B, 1)`; NaN/inf weights become 0. The VESPO loss is `-phi(w) A log pi`.
    """
    lower = math.log(1e-8)
    seq = (token_log_ratio.clamp(-20.0, 20.0) * mask.to(token_log_ratio.dtype)).sum(-1, keepdim=True)
    log_w = seq.clamp(lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_surrogate(phi: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor) -> SurrogateOutput:
    """VESPO's per-token loss `-phi A log pi` for the (detached) gamma weight `phi` of `vespo_gamma_weight`."""
    per_token_loss = -phi * advantages * logps
    flags = _no_flags(per_token_loss)
    return SurrogateOutput(per_token_loss, phi.expand_as(per_token_loss), flags, flags, flags)


@torch.no_grad()
def off_policy_sequence_mask(
    advantages: torch.Tensor,
    logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """
    Off-policy sequence masking (OPSM, DeepSeek-V3.2): `(B, 1)`, 0 for a sequence with a negative advantage whose mean
    token `log pi_rollout - log pi` (an estimate of KL(rollout || trained policy) on the rollout's samples) exceeds
    `threshold`, 1 otherwise. Under ALP `logps` are the perturbed policy's: the reference is the rollout policy, the
    numerator the policy the ratio uses. Tokens without a rollout log-prob (NaN) add nothing to the mean.
    """
    kl = torch.nan_to_num(rollout_logps - logps.detach(), nan=0.0)
    mean_kl = masked_mean(kl, mask, dim=-1).unsqueeze(-1)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def entropy_bonus_term(entropies: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entropy bonus TRL subtracts (times its coefficient): the mean token entropy over `mask`."""
    return masked_mean(entropies, mask)


@dataclass
class RolloutCorrection:
    """The auxiliary rollout correction of the MIS / TIS baselines for one batch (all detached, `(B, T)`).

    `weight` multiplies the per-token loss (0 where rejected); `keep` is the loss mask the rejection leaves (0 on
    rejected tokens / sequences with `rejection="drop"`, all ones with `"zero"`); `rejected`, `truncated` and `vetoed`
    mark what fired, for the metrics.
    """

    weight: torch.Tensor
    keep: torch.Tensor
    rejected: torch.Tensor
    truncated: torch.Tensor
    vetoed: torch.Tensor


@torch.no_grad()
def rollout_correction(
    old_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    mode: str = "mask",
    low: float | None = None,
    high: float | None = 3.0,
    aggregation: str = "sum",
    veto: float | None = None,
    rejection: str = "drop",
    clamp: float = 20.0,
) -> RolloutCorrection:
    """
    The auxiliary weight `w = pi_old / pi_rollout` of the MIS / TIS baselines (verl's rollout correction, slime's
    MIS / TIS, TRL's `vllm_importance_sampling_mode`), as a pure function.

    - `level="token"`: one weight per token; `"sequence"`: the sequence's weight on all its tokens, the product of the
      token ratios (`aggregation="sum"` of the log-ratios) or their geometric mean (`"mean"`).
    - `mode="mask"` (MIS): weights below `low` or above `high` are rejected (a bound that is `None` is not checked);
      `mode="truncate"` (TIS): weights are clamped to `[low, high]` (`high` is required, `low` optional).
    - `veto`: a sequence with any token ratio below `veto` is rejected whole (both modes).
    - `rejection="drop"` removes rejected tokens / sequences from the loss mask (`keep`), so they leave the loss's
      denominator too (verl, slime); `"zero"` only zeroes their weight and keeps them in the denominator (TRL).

    Tokens whose rollout log-prob is NaN count as ratio 1. Log-weights are clamped to `[-clamp, clamp]`.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"Unknown level {level!r}; allowed values are ['token', 'sequence'].")
    if mode not in ("mask", "truncate"):
        raise ValueError(f"Unknown mode {mode!r}; allowed values are ['mask', 'truncate'].")
    if rejection not in ("drop", "zero"):
        raise ValueError(f"Unknown rejection {rejection!r}; allowed values are ['drop', 'zero'].")
    mask_f = mask.to(old_logps.dtype)
    token_log_w = torch.nan_to_num(old_logps - rollout_logps, nan=0.0) * mask_f
    log_w = token_log_w if level == "token" else sequence_log_ratio(token_log_w, mask_f, aggregation).expand_as(mask_f)
    w = torch.exp(log_w.clamp(-clamp, clamp))
    on = mask_f.bool()
    rejected = torch.zeros_like(on)
    truncated = torch.zeros_like(on)
    if mode == "truncate":
        if high is None:
            raise ValueError("mode='truncate' needs an upper bound `high`.")
        clamped = w.clamp(min=low, max=high)
        truncated = (clamped != w) & on
        w = clamped
    else:
        if low is not None:
            rejected |= w < low
        if high is not None:
            rejected |= w > high
        rejected &= on
    vetoed = torch.zeros_like(on[:, :1])
    if veto is not None:
        vetoed = ((torch.exp(token_log_w.clamp(-clamp, clamp)) < veto) & on).any(-1, keepdim=True)
        rejected |= vetoed & on
    weight = w * (~rejected).to(w.dtype) * mask_f
    keep = (~rejected).to(mask_f.dtype) if rejection == "drop" else torch.ones_like(mask_f)
    return RolloutCorrection(weight, keep, rejected, truncated, vetoed.expand_as(on))


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


# ------------------------------------------------------------------------------------------- the whole policy loss
# How each loss type reduces its per-token loss (the ones not listed reduce by their own name): as TRL does.
LOSS_AGGREGATION = {"cispo": "dapo", "vespo": "dapo", "sapo": "grpo"}


@dataclass(frozen=True)
class PolicyLossSettings:
    """The config values the policy loss reads (defaults: `ALPConfig`'s). Build it from a config with `from_config`,
    so that every caller (the trainer, `alp-trl diagnose`, the study) optimises the same objective."""

    off_policy_correction: str = "alp"
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    sequence_ratio_aggregation: str = "mean"
    log_ratio_clamp: float = 20.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip_c: float | None = 10.0
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    max_completion_length: int | None = None
    rollout_correction_kwargs: dict | None = None

    @classmethod
    def from_config(cls, args) -> "PolicyLossSettings":
        """The settings of an `ALPConfig` (as `GRPOTrainer` reads them: `epsilon_high` defaults to `epsilon`)."""
        derived = ("epsilon_low", "epsilon_high", "rollout_correction_kwargs")
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if name not in derived}
        values["epsilon_low"] = args.epsilon
        values["epsilon_high"] = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        if correction(args.off_policy_correction).has_rollout_weight:
            values["rollout_correction_kwargs"] = args.rollout_correction_kwargs()
        return cls(**values)

    @property
    def correction(self) -> Correction:
        return correction(self.off_policy_correction)

    @property
    def aggregation(self) -> str:
        """The `aggregate_loss` rule of `loss_type`."""
        return LOSS_AGGREGATION.get(self.loss_type, self.loss_type)


@dataclass
class PolicyLoss:
    """The per-token policy loss of one batch and what it was built from (for metrics)."""

    per_token_loss: torch.Tensor  # (B, T), with the KL-to-reference term, before aggregation
    mask: torch.Tensor  # the tokens it acts on (a MIS rejection with `drop` removes tokens)
    denominator: torch.Tensor  # the ratio's denominator log-probs
    rollout_logps: torch.Tensor  # the rollout policy's log-probs, NaN replaced by the numerator's
    surrogate: SurrogateOutput
    extra: dict  # per-token or per-sequence values to log (VESPO's phi, the KL to the reference)
    token_mask: torch.Tensor | None = None  # the tokens `select_tokens` kept for the surrogate (None: all of `mask`)


def policy_loss(
    logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: PolicyLossSettings,
    old_logps: torch.Tensor | None = None,
    rollout_weight: torch.Tensor | None = None,
    rollout_keep: torch.Tensor | None = None,
    select_tokens=None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = False,
) -> PolicyLoss:
    """
    The per-token policy loss of every correction and loss type except TRL's own (`"none"`).

    `logps` are the numerator's log-probs, with gradient (the perturbed policy's under ALP); `rollout_logps` the
    sampling policy's (NaN where the engine could not score a token: ratio 1 there). ALP and Bypass divide by the
    rollout policy; PPO and the MIS / TIS baselines by `old_logps` (the policy before the update; `None`: the detached
    numerator, i.e. the first update on a batch), the MIS / TIS weight pi_old / pi_rollout on top (`rollout_weight` and
    the tokens it keeps, `rollout_keep`, from `rollout_correction` once per generation batch; `None`: computed here
    from this batch). `select_tokens(mask)` returns a `(B, T)` 0/1 mask of the tokens the surrogate keeps (TRL's
    high-entropy token selection, `top_entropy_quantile`), `ref_logps` and `beta` add the KL to the reference model
    (k3), weighted by the ratio with `use_bias_correction_kl`.
    """
    spec = settings.correction
    if spec.is_trl_loss:
        raise ValueError("off_policy_correction='none' is TRL's own loss: GRPOTrainer computes it.")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    rollout_logps = torch.where(torch.isnan(rollout_logps), logps.detach(), rollout_logps)
    weight = None
    if spec.divides_by_rollout:
        denominator = rollout_logps
    else:
        denominator = logps.detach() if old_logps is None else old_logps
        if spec.has_rollout_weight:
            if rollout_weight is None:
                corr = rollout_correction(denominator, rollout_logps, mask, **settings.rollout_correction_kwargs)
                rollout_weight, rollout_keep = corr.weight, corr.keep
            weight = rollout_weight
            mask = mask * rollout_keep
    s = settings
    log_ratio = importance_log_ratio(
        logps, denominator, mask, s.importance_sampling_level, s.sequence_ratio_aggregation, s.log_ratio_clamp
    )
    extra = {}
    if s.loss_type == "cispo":
        surrogate = cispo_surrogate(log_ratio, advantages, logps, s.epsilon_high)
    elif s.loss_type == "sapo":
        surrogate = sapo_surrogate(log_ratio, advantages, s.sapo_temperature_pos, s.sapo_temperature_neg)
    elif s.loss_type == "vespo":
        # the sequence weight of the token log-ratios (numerator over the rollout policy for ALP / Bypass)
        phi = vespo_gamma_weight(
            logps.detach() - denominator,
            advantages,
            mask,
            s.vespo_k_pos,
            s.vespo_lambda_pos,
            s.vespo_k_neg,
            s.vespo_lambda_neg,
        )
        surrogate = vespo_surrogate(phi, advantages, logps)
        extra["vespo/phi_seq_mean"] = phi
    else:
        surrogate = clipped_surrogate(log_ratio, advantages, s.epsilon_low, s.epsilon_high, s.dual_clip_c, s.delta)
    per_token_loss = surrogate.per_token_loss
    if weight is not None:
        per_token_loss = per_token_loss * weight
    if s.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_sequence_mask(
            advantages, logps, rollout_logps, mask, s.off_policy_mask_threshold
        )
    token_mask = select_tokens(mask) if select_tokens is not None else None
    if token_mask is not None:
        per_token_loss = per_token_loss * token_mask
    if beta != 0.0:
        per_token_kl = low_variance_kl(logps, ref_logps)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * kl_correction_weight(
                logps, denominator, mask, s.importance_sampling_level, s.sequence_ratio_aggregation, s.log_ratio_clamp
            )
        per_token_loss = per_token_loss + beta * per_token_kl
        extra["kl"] = per_token_kl
    return PolicyLoss(per_token_loss, mask, denominator, rollout_logps, surrogate, extra, token_mask)


def aggregate_policy_loss(
    loss: PolicyLoss,
    settings: PolicyLossSettings,
    accumulation: float = 1.0,
    num_items: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(the loss to backpropagate, the policy loss's value)` of one micro-batch, reduced as `loss_type` says. DAPO
    divides by `num_items` (the token count of one accumulation window, per process), which already accounts for
    accumulation; the other rules are divided by `accumulation`."""
    if settings.aggregation == "dapo":
        total = aggregate_loss(loss.per_token_loss, loss.mask, "dapo", num_items=num_items)
        return total, total.detach()
    total = aggregate_loss(loss.per_token_loss, loss.mask, settings.aggregation, settings.max_completion_length)
    return total / accumulation, total.detach()
