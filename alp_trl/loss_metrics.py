"""The metrics of the policy update and of the MIS / TIS correction, reduced across ranks with one collective each.

Every extra GPU synchronisation stalls a training step, so each function below gathers everything it logs at once.
Fractions of per-sequence flags (shape `(B, 1)`: sequence-level clipping, sequence MIS) are fractions of sequences, as
in TRL's GRPO; per-token flags are fractions of completion tokens.
"""

import torch

from .objectives import PolicyLoss, RolloutCorrection
from .ratio_statistics import importance_weight_sums, ratio_statistics, weight_diagnostics


def reduce_named_scalars(accelerator, named: dict[str, tuple[torch.Tensor, str]]) -> dict[str, float]:
    """Reduce named 0-d tensors across ranks, each by its own rule (`"mean"`, `"max"`, `"min"`, `"sum"`), with one
    gather for all of them; returns plain floats by name."""
    names = list(named)
    device = named[names[0]][0].device
    row = torch.stack([named[n][0].detach().float().to(device) for n in names]).unsqueeze(0)
    gathered = accelerator.gather(row).view(-1, len(names))
    rules = {"mean": torch.mean, "max": torch.amax, "min": torch.amin, "sum": torch.sum}
    return {n: rules[named[n][1]](gathered[:, i]).item() for i, n in enumerate(names)}


def per_sequence_mean(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each completion's tokens that a `(B, T)` flag marks, `(B,)`."""
    return (flags.detach().float() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def sequence_flag(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, 1)`: whether a `(B, T)` flag marks any completion token of each sequence."""
    return (flags.bool() & mask.bool()).any(-1, keepdim=True)


def log_rollout_correction(accelerator, metrics, corr: RolloutCorrection, mask: torch.Tensor, spec: dict) -> None:
    """What the MIS / TIS weight of a generation batch did: the fraction of tokens (or sequences, at sequence level)
    truncated (TIS), rejected (MIS, or by the veto), and of sequences vetoed."""
    mask_f = mask.float()
    seq_mask = (mask_f.sum(-1) > 0).float()
    sequence = spec["level"] == "sequence"
    rejected = sequence_flag(corr.rejected, mask).squeeze(-1).float() if sequence else corr.rejected.float()
    truncated = sequence_flag(corr.truncated, mask).squeeze(-1).float() if sequence else corr.truncated.float()
    denominator = seq_mask if sequence else mask_f
    local = torch.stack(
        [
            (rejected * denominator).sum(),
            (truncated * denominator).sum(),
            denominator.sum(),
            (corr.vetoed[:, 0].float() * seq_mask).sum(),
            seq_mask.sum(),
        ]
    )
    rej, trunc, count, vetoed, sequences = accelerator.reduce(local, reduction="sum").tolist()
    if spec["mode"] == "truncate":
        metrics["alp/tis_truncated_frac"].append(trunc / max(count, 1.0))
    if spec["mode"] == "mask" or spec["veto"] is not None:
        metrics["alp/mis_masked_frac"].append(rej / max(count, 1.0))
    if spec["veto"] is not None:
        metrics["alp/mis_veto_frac"].append(vetoed / max(sequences, 1.0))


def log_policy_update(
    accelerator,
    metrics,
    args,
    logps: torch.Tensor,
    loss: PolicyLoss,
    entropies: torch.Tensor,
    survival: dict[int, torch.Tensor],
) -> None:
    """Log the clip fractions, the entropy, the train-vs-rollout ratio statistics and importance-weight diagnostics,
    and the noise survival per layer of one policy-update micro-batch, with one reduction and one gather.

    `logps` are the numerator's (the perturbed policy's under ALP), `loss` what `objectives.policy_loss` returned
    (its `extra` values are averaged too: VESPO's phi, the KL to the reference), `survival` the perturbation's
    per-layer noise survival (empty outside ALP's training mode)."""
    surrogate, level, mask = loss.surrogate, args.importance_sampling_level, loss.mask
    low, high, dual = surrogate.low_clipped, surrogate.high_clipped, surrogate.dual_clipped
    flags = {
        "clip_ratio/low_mean": low,
        "clip_ratio/high_mean": high,
        "clip_ratio/region_mean": low | high,
        "alp/dual_clip_frac": dual,
        "alp/clip_frac": low | high | dual,
    }
    if args.loss_type == "cispo":  # TRL's name for CISPO's truncated weights
        flags["cispo_clip_ratio"] = high
    if level == "sequence":  # a sequence's flags are the same on all its tokens
        flags = {name: sequence_flag(value, mask) for name, value in flags.items()}
    token_means = {"entropy": entropies, **flags, **loss.extra}
    mask_f = mask.float()
    seq_mask = (mask_f.sum(-1, keepdim=True) > 0).float()
    sums, per_sequence = [], []
    for value in token_means.values():
        value = value.detach().float()
        per_sequence.append(value.dim() == 2 and value.size(-1) == 1 and mask_f.size(-1) > 1)
        sums.append((value * seq_mask).sum() if per_sequence[-1] else (value.expand_as(mask_f) * mask_f).sum())
    # the importance-weight diagnostics (train vs rollout, at the ratio's level), in the same reduction
    train_rollout = logps.detach() - loss.rollout_logps
    weight_sums = importance_weight_sums(
        train_rollout, mask, level, args.sequence_ratio_aggregation, args.log_ratio_clamp
    )
    summed = [k for k in weight_sums if k != "abs_max_preclamp"]
    totals = accelerator.reduce(
        torch.stack([*sums, *(weight_sums[k] for k in summed), mask_f.sum(), seq_mask.sum()]), reduction="sum"
    ).tolist()
    num_tokens, num_sequences = totals[-2], totals[-1]
    for name, total, sequence in zip(token_means, totals, per_sequence):
        metrics[name].append(total / max(num_sequences if sequence else num_tokens, 1.0))
    reduced_weights = dict(zip(summed, totals[len(sums) : len(sums) + len(summed)]))

    # Token-level train-vs-rollout statistics (the train side is the perturbed policy under ALP).
    stats = ratio_statistics(train_rollout, mask)
    named = {
        "alp/ratio/p50": (stats["ratio_p50"], "mean"),
        "alp/ratio/p99": (stats["ratio_p99"], "mean"),
        "alp/ratio/max": (stats["ratio_max"], "max"),
        "alp/log_ratio_abs_max": (stats["log_ratio_abs_max"], "max"),
        "alp/train_rollout_kl": (stats["kl_k3"], "mean"),
        # TRL's per-sequence extremes of the clip fractions: the least low-clipped and the most high-clipped sequence
        "clip_ratio/low_min": (per_sequence_mean(low, mask_f).min(), "min"),
        "clip_ratio/high_max": (per_sequence_mean(high, mask_f).max(), "max"),
        "abs_max_preclamp": (weight_sums["abs_max_preclamp"], "max"),
    }
    for layer, value in survival.items():  # mean over ranks, per layer
        named[f"alp/noise_survival/layer_{layer:02d}"] = (value, "mean")
    reduced = reduce_named_scalars(accelerator, named)  # one gather for all of them
    for name, value in reduced.items():
        if name != "abs_max_preclamp":
            metrics[name].append(value)
    diagnostics = weight_diagnostics({**reduced_weights, "abs_max_preclamp": reduced["abs_max_preclamp"]})
    for name in ("is_weight_chi2", "is_weight_ess_frac", "ppl_ratio", "seq_clamped_frac"):
        metrics[f"alp/{name}"].append(diagnostics[name])
    metrics["alp/log_ratio_abs_max_preclamp"].append(diagnostics["abs_max_preclamp"])
    if survival:
        per_layer = [reduced[f"alp/noise_survival/layer_{layer:02d}"] for layer in survival]
        metrics["alp/noise_survival"].append(sum(per_layer) / len(per_layer))


def log_sigma(metrics, per_layer: dict[int, float]) -> None:
    """sigma's mean over layers and its value per layer."""
    metrics["alp/sigma_mean"].append(sum(per_layer.values()) / len(per_layer))
    for layer, value in per_layer.items():
        metrics[f"alp/sigma/layer_{layer:02d}"].append(value)


def log_rollout_ratio(accelerator, metrics, prefix: str, logps: torch.Tensor, rollout_logps: torch.Tensor, mask):
    """The ratio of `logps` to the rollout over `mask`, logged under `prefix`: `{prefix}ratio/{p50,p99,max}`,
    `{prefix}log_ratio_abs_max` and `{prefix}train_rollout_kl` (k3 estimate of KL(rollout || policy) on the rollout
    tokens). Two uses: under ALP, the policy itself without the noise (`alp/unperturbed_`, `log_unperturbed_ratio`);
    under a MIS rejection that drops tokens from the loss, the policy over every scored token, the dropped ones
    included (`alp/all_tokens_`), since the update's own statistics see only the tokens the rejection kept."""
    stats = ratio_statistics(logps.detach() - rollout_logps, mask)
    named = {
        f"{prefix}ratio/p50": (stats["ratio_p50"], "mean"),
        f"{prefix}ratio/p99": (stats["ratio_p99"], "mean"),
        f"{prefix}ratio/max": (stats["ratio_max"], "max"),
        f"{prefix}log_ratio_abs_max": (stats["log_ratio_abs_max"], "max"),
        f"{prefix}train_rollout_kl": (stats["kl_k3"], "mean"),
    }
    for name, value in reduce_named_scalars(accelerator, named).items():
        metrics[name].append(value)
