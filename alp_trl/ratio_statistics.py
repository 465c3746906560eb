"""Diagnostics of the importance ratio the paper plots: tail quantiles and the train-vs-rollout KL."""

import torch


@torch.no_grad()
def ratio_statistics(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Statistics of the per-token log-ratio `log(pi_train / pi_rollout)` over the masked-in tokens.

    Returns 0-dim tensors: `ratio_p50`, `ratio_p99`, `ratio_max`, `ratio_min`, `log_ratio_abs_max`, and
    `kl_k3` (mean of `r - 1 - log r`, a non-negative estimate of KL(pi_rollout || pi_train) on rollout samples) and
    `kl_k1` (mean of `-log r`). All are 0 when no token is masked in.
    """
    values = log_ratio.detach().float()[mask.bool().expand_as(log_ratio)]
    if values.numel() == 0:
        zero = torch.zeros((), device=log_ratio.device)
        return {
            k: zero
            for k in ("ratio_p50", "ratio_p99", "ratio_max", "ratio_min", "log_ratio_abs_max", "kl_k3", "kl_k1")
        }
    ratio = values.exp()
    quantiles = torch.quantile(ratio, torch.tensor([0.5, 0.99], device=ratio.device))
    return {
        "ratio_p50": quantiles[0],
        "ratio_p99": quantiles[1],
        "ratio_max": ratio.max(),
        "ratio_min": ratio.min(),
        "log_ratio_abs_max": values.abs().max(),
        "kl_k3": (ratio - 1 - values).mean(),
        "kl_k1": (-values).mean(),
    }


@torch.no_grad()
def mismatch_statistics(train_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """
    How far the rollout (inference) policy is from the unperturbed training policy on the rollout tokens.

    Returns 0-dim tensors: `logp_abs_diff_mean`, `logp_abs_diff_max` (|log pi_train - log pi_rollout| per token),
    `prob_abs_diff_max` (largest |pi_train - pi_rollout| of a sampled token) and `kl_k3` (KL(rollout || train)).
    NaN rollout log-probs are left out.
    """
    diff = train_logps.detach().float() - rollout_logps.float()
    keep = mask.bool() & ~torch.isnan(diff)
    diff = diff[keep]
    if diff.numel() == 0:
        zero = torch.zeros((), device=train_logps.device)
        return {k: zero for k in ("logp_abs_diff_mean", "logp_abs_diff_max", "prob_abs_diff_max", "kl_k3")}
    prob_diff = (train_logps.detach().float().exp() - rollout_logps.float().exp())[keep]
    return {
        "logp_abs_diff_mean": diff.abs().mean(),
        "logp_abs_diff_max": diff.abs().max(),
        "prob_abs_diff_max": prob_diff.abs().max(),
        "kl_k3": (diff.exp() - 1 - diff).mean(),
    }


def binned_log_ratio_envelope(
    log_ratio: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    bins: list[float] | None = None,
    quantiles: tuple[float, ...] = (0.01, 0.05, 0.5, 0.95, 0.99),
) -> list[dict]:
    """
    The paper's quantile envelope: tokens binned by their rollout probability, and per bin the quantiles of the
    log-ratio (training vs rollout policy). Returns one dict per non-empty bin: `lo`, `hi`, `count`, and `q<p>`.
    """
    bins = bins or [0.0, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 1.0 + 1e-9]
    keep = mask.bool() & ~torch.isnan(rollout_logps) & ~torch.isnan(log_ratio)
    probs = rollout_logps[keep].float().exp()
    values = log_ratio[keep].float()
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        selected = values[(probs >= lo) & (probs < hi)]
        if selected.numel() == 0:
            continue
        qs = torch.quantile(selected, torch.tensor(quantiles, dtype=selected.dtype))
        row = {"lo": lo, "hi": min(hi, 1.0), "count": int(selected.numel())}
        row.update({f"q{round(q * 100):02d}": float(v) for q, v in zip(quantiles, qs)})
        rows.append(row)
    return rows


@torch.no_grad()
def importance_weight_sums(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    aggregation: str = "mean",
    clamp: float = 20.0,
) -> dict[str, torch.Tensor]:
    """
    Rank-local sums behind the importance-weight diagnostics of verl / slime, for the train-vs-rollout log-ratio
    `log(pi_train / pi_rollout)` `(B, T)` at the ratio's `level` (tokens, or sequences with `aggregation`):

    `w_sum`, `w2_sum`, `count` (weights `w = exp(clamp(log_ratio))` over tokens or non-empty sequences), `ppl_ratio_sum`
    (over sequences: training perplexity / rollout perplexity = `exp(-mean_t log_ratio)`), `sequences`,
    `clamped_sequences` (a token, or the sequence, beyond `clamp`), and `abs_max_preclamp`. Reduced over ranks, they
    give `chi2 = sum w^2 / count - 1`, `ess_frac = (sum w)^2 / (count sum w^2)`, the mean perplexity ratio, the clamped
    fraction and the largest log-ratio before clamping (`weight_diagnostics`).
    """
    mask_f = mask.to(torch.float32)
    lr = log_ratio.detach().float() * mask_f
    tokens = mask_f.sum(-1, keepdim=True)
    has = (tokens > 0).float()
    mean_lr = lr.sum(-1, keepdim=True) / tokens.clamp(min=1.0)
    if level == "sequence":
        seq_lr = mean_lr if aggregation == "mean" else lr.sum(-1, keepdim=True)
        w = torch.exp(seq_lr.clamp(-clamp, clamp)) * has
        count, abs_max = has.sum(), (seq_lr.abs() * has).max() if has.numel() else torch.zeros(())
        clamped = (seq_lr.abs() > clamp).float() * has
    else:
        w = torch.exp(lr.clamp(-clamp, clamp)) * mask_f
        count, abs_max = mask_f.sum(), lr.abs().max() if lr.numel() else torch.zeros(())
        clamped = ((lr.abs() > clamp).float() * mask_f).amax(-1, keepdim=True) if lr.numel() else has
    return {
        "w_sum": w.sum(),
        "w2_sum": (w * w).sum(),
        "count": count,
        "ppl_ratio_sum": (torch.exp(-mean_lr) * has).sum(),
        "sequences": has.sum(),
        "clamped_sequences": clamped.sum(),
        "abs_max_preclamp": abs_max,
    }


def weight_diagnostics(sums: dict[str, float]) -> dict[str, float]:
    """The diagnostics from (rank-reduced) `importance_weight_sums`: `is_weight_chi2`, `is_weight_ess_frac`,
    `ppl_ratio`, `seq_clamped_frac` (and `abs_max_preclamp` passed through)."""
    count, w_sum, w2_sum = sums["count"], sums["w_sum"], sums["w2_sum"]
    sequences = max(sums["sequences"], 1.0)
    return {
        "is_weight_chi2": w2_sum / count - 1.0 if count else 0.0,
        "is_weight_ess_frac": w_sum**2 / (count * w2_sum) if count and w2_sum else 1.0,
        "ppl_ratio": sums["ppl_ratio_sum"] / sequences,
        "seq_clamped_frac": sums["clamped_sequences"] / sequences,
        "abs_max_preclamp": sums["abs_max_preclamp"],
    }
