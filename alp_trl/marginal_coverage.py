"""The marginal-coverage test: is the noise-AVERAGED perturbed policy closer to the inference engine than the policy?

The ALP paper's theorem bounds the KL between the inference distribution and the perturbed training distribution
*averaged over the noise* ("for analytical convenience, we take the expectation over [the noise]"), when sigma is at
least the norm of the engine's bias on the layer features. This module measures exactly that, per rollout token:

- the unperturbed policy's log-prob of each rollout token;
- the noise-averaged policy `pi_bar = (1/K) sum_k pi_k` over K perturbed forward passes (`averaged_log_probs`, the
  log of the mean of the K distributions, over the whole vocabulary);
- a control that smooths without noise: the unperturbed policy at a temperature chosen so that its mean entropy
  equals the averaged policy's (`matched_temperature`); if the averaged policy is closer to the engine only because it
  is flatter, the control is as close;
- one perturbed draw (what ALP's ratio uses at each update, and what the first evidence grid measured).

Distances are KL(inference || X), estimated on the rollout tokens, which the engine sampled: per token
`log p_inf(y) - log p_X(y)` (k1, unbiased) and `(r - 1) - log r` with `r = p_X(y) / p_inf(y)` (k3, unbiased, >= 0);
both are averaged over the same tokens for every X, so differences between X are paired. The log-ratio
`log p_X(y) - log p_inf(y)` is also binned by the token's rollout probability (the paper's Figure 2 envelope).

`matched_sigma` gives an engine's scale in the perturbation's own units: the sigma (absolute or rms) at which ONE
perturbed draw is as far from the unperturbed policy (exact KL over the vocabulary, mean per token) as the engine is
(its KL to the unperturbed policy on the rollout tokens, k3).
"""

import math
from dataclasses import dataclass

import torch

from .ratio_statistics import binned_log_ratio_envelope


def completion_log_probs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """`(B, T, V)` float32 log-probs (temperature-scaled) of the positions that predict each completion token of a
    rollout batch (`intervention.RolloutBatch`); no gradient."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, batch.prompt_ids.size(1) - 1 : -1]
    return torch.log_softmax(logits.float() / temperature, -1)


def averaged_log_probs(model, perturbation, batch, draws: int, key: int, temperature: float = 1.0):
    """`(log pi_bar, log pi_1)`: the log of the mean over `draws` perturbed forward passes of the policy's
    distribution (noise keys `key .. key + draws - 1`), and the first draw alone, both `(B, T, V)`."""
    if draws < 1:
        raise ValueError(f"`draws` must be >= 1, got {draws}.")
    total, first = None, None
    for k in range(draws):
        with perturbation.active(step=key + k):
            log_probs = completion_log_probs(model, batch, temperature)
        if first is None:
            first = log_probs
            total = log_probs.clone()
        else:
            total = torch.logaddexp(total, log_probs)
    return total - math.log(draws), first


def token_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`(B, T)`: the log-prob of each token under `(B, T, V)` log-probs."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def mean_entropy(log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean entropy per token of `(B, T, V)` log-probs over the positions `mask` marks."""
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    mask = mask.to(entropy.dtype)
    return float((entropy * mask).sum() / mask.sum().clamp(min=1.0))


def matched_temperature(
    log_probs: torch.Tensor, mask: torch.Tensor, target_entropy: float, low: float = 0.05, high: float = 20.0
) -> float:
    """The temperature `T` at which `log_softmax(log_probs / T)` has mean entropy `target_entropy` (bisection on
    log T; entropy grows with T). Clipped to `[low, high]`."""
    lo, hi = math.log(low), math.log(high)
    for _ in range(40):
        mid = (lo + hi) / 2
        if mean_entropy(torch.log_softmax(log_probs / math.exp(mid), -1), mask) < target_entropy:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def kl_to_inference(logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """KL(inference || X) per token, estimated on the tokens the inference engine sampled: `k1` (mean of
    `log p_inf - log p_X`) and `k3` (mean of `(r - 1) - log r`, `r = p_X / p_inf`), over `mask`."""
    mask = mask.bool() & ~torch.isnan(rollout_logps)
    log_r = (logps - rollout_logps)[mask].double()
    return {
        "kl_k1": float((-log_r).mean()),
        "kl_k3": float((torch.expm1(log_r) - log_r).mean()),
        "count": int(mask.sum()),
    }


def exact_kl(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per token of the exact KL(p || q) over the vocabulary, `(B, T, V)` log-probs, over `mask`."""
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = mask.to(kl.dtype)
    return float((kl * mask).sum() / mask.sum().clamp(min=1.0))


@dataclass
class CoverageRow:
    """The distance of one policy (unperturbed, averaged, temperature control, one draw) to the engine: the KL
    estimates, the binned envelope, and per sequence `[sum of log p_X - log p_inf, tokens]` (for paired differences
    between policies and a bootstrap over sequences)."""

    kl_k1: float
    kl_k3: float
    count: int
    envelope: list[dict]
    per_sequence: list[list[float]]

    @classmethod
    def of(cls, logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> "CoverageRow":
        kl = kl_to_inference(logps, rollout_logps, mask)
        envelope = binned_log_ratio_envelope(logps - rollout_logps, rollout_logps, mask)
        keep = mask.bool() & ~torch.isnan(rollout_logps)
        log_ratio = torch.where(keep, logps - rollout_logps, torch.zeros_like(logps)).double()
        per_sequence = [[float(total), int(count)] for total, count in zip(log_ratio.sum(-1), keep.sum(-1))]
        return cls(kl["kl_k1"], kl["kl_k3"], kl["count"], envelope, per_sequence)


def coverage(
    model, perturbation, batches: list, draws: int, key: int, temperature: float = 1.0
) -> dict[str, CoverageRow | float]:
    """The marginal-coverage measurement of one perturbation on rollout batches sampled by an engine: a
    `CoverageRow` for `"unperturbed"`, `"averaged"` (the noise-averaged policy over `draws`), `"temperature"` (the
    entropy-matched control) and `"one_draw"`; plus `"temperature_T"`, the control's temperature, and the mean
    entropies (`"entropy_unperturbed"`, `"entropy_averaged"`)."""
    parts = {name: [] for name in ("unperturbed", "averaged", "one_draw")}
    unperturbed_log_probs, averaged_entropy, unperturbed_entropy, weights = [], [], [], []
    for index, batch in enumerate(batches):
        unperturbed = completion_log_probs(model, batch, temperature)
        averaged, first = averaged_log_probs(model, perturbation, batch, draws, key + 1000 * index, temperature)
        tokens, mask = batch.completion_ids, batch.completion_mask
        parts["unperturbed"].append(token_log_probs(unperturbed, tokens))
        parts["averaged"].append(token_log_probs(averaged, tokens))
        parts["one_draw"].append(token_log_probs(first, tokens))
        unperturbed_log_probs.append(unperturbed)
        averaged_entropy.append(mean_entropy(averaged, mask))
        unperturbed_entropy.append(mean_entropy(unperturbed, mask))
        weights.append(float(mask.sum()))
    total = sum(weights)
    target = sum(e * w for e, w in zip(averaged_entropy, weights)) / total
    # one temperature for all batches: the entropy is matched over every rollout token
    joint_log_probs = torch.cat(
        [_pad_to(c, max(x.size(1) for x in unperturbed_log_probs)) for c in unperturbed_log_probs]
    )
    joint_mask = torch.cat([_pad_to(b.completion_mask, joint_log_probs.size(1)) for b in batches])
    temp = matched_temperature(joint_log_probs, joint_mask, target)
    tempered = token_log_probs(torch.log_softmax(joint_log_probs / temp, -1), joint(batches, "completion_ids"))
    rollout, mask = joint(batches, "rollout_logps"), joint_mask
    result = {name: CoverageRow.of(_cat_padded(values), rollout, mask) for name, values in parts.items()}
    result["temperature"] = CoverageRow.of(tempered, rollout, mask)
    result["temperature_T"] = temp
    result["entropy_unperturbed"] = sum(e * w for e, w in zip(unperturbed_entropy, weights)) / total
    result["entropy_averaged"] = target
    return result


class ScaleOutOfRange(ValueError):
    """The engine's KL is outside what a sigma in the searched range gives."""


def matched_sigma(
    model,
    attach,
    batches: list,
    target_kl: float,
    key: int = 0,
    low: float = 1e-5,
    high: float = 1.0,
    steps: int = 12,
    temperature: float = 1.0,
) -> float:
    """The sigma at which one perturbed draw's exact KL(draw || unperturbed) per token, on the rollout positions,
    equals `target_kl` (bisection on log sigma; the KL grows with sigma). `attach(sigma)` returns a perturbation
    attached to `model` with that sigma, and is detached again here. Raises `ScaleOutOfRange` when the answer would
    sit at an end of `[low, high]` (the engine is closer, or farther, than any sigma there)."""
    unperturbed = [completion_log_probs(model, batch, temperature) for batch in batches]

    def draw_kl(sigma: float) -> float:
        perturbation = attach(sigma)
        try:
            values, weights = [], []
            for index, (batch, log_q) in enumerate(zip(batches, unperturbed)):
                with perturbation.active(step=key + index):
                    log_p = completion_log_probs(model, batch, temperature)
                values.append(exact_kl(log_p, log_q, batch.completion_mask))
                weights.append(float(batch.completion_mask.sum()))
            return sum(v * w for v, w in zip(values, weights)) / sum(weights)
        finally:
            perturbation.detach()

    if draw_kl(low) > target_kl or draw_kl(high) < target_kl:
        raise ScaleOutOfRange(f"the engine's KL {target_kl:.3g} is outside what sigma in [{low:g}, {high:g}] gives")
    lo, hi = math.log(low), math.log(high)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if draw_kl(math.exp(mid)) < target_kl:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _pad_to(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad dim 1 of a `(B, T, ...)` tensor with zeros to `width`."""
    pad = width - tensor.size(1)
    if pad == 0:
        return tensor
    shape = list(tensor.shape)
    shape[1] = pad
    return torch.cat([tensor, tensor.new_zeros(shape)], 1)


def _cat_padded(values: list[torch.Tensor]) -> torch.Tensor:
    width = max(v.size(1) for v in values)
    return torch.cat([_pad_to(v, width) for v in values])


def joint(batches: list, field: str) -> torch.Tensor:
    """One field of rollout batches, concatenated over batches (right-padded to the widest)."""
    return _cat_padded([getattr(b, field) for b in batches])
