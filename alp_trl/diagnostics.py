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
