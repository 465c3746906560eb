"""Sampling-mask replay: the policy's log-probs over the tokens a truncated sampler kept at each position.

With `top_p < 1`, `top_k > 0` or `min_p > 0` the rollout is drawn from a truncated, renormalised distribution: vLLM
reports those log-probs (`logprobs_mode="processed_logprobs"`), and the transformers recorder does too when asked. An
importance ratio whose numerator is the policy's *full* distribution is then biased on every token (the numerator
misses the renormalisation). Replay computes the numerator over the kept set instead.

The kept set follows vLLM's sampler (`vllm/v1/sample`), in its order, on the temperature-scaled logits:

1. `min_p`: drop tokens whose probability is below `min_p` times the top token's;
2. `top_k`: keep the `k` largest logits (ties at the k-th value kept);
3. `top_p`: over what is left, sorted ascending, drop the tokens whose cumulative probability is `<= 1 - top_p`
   (the most likely token always stays).

The set is computed from the logits of the forward pass that scores the tokens (the trainer's own policy; under ALP
the perturbed one), so the ratio compares the two sampling distributions; the sampled token is always kept so that the
ratio stays finite where the engine's and the policy's sets differ at the boundary. Transformers applies `min_p`
after `top_p`: the two orders differ only when both are set.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingTruncation:
    """The truncation of one sampler: `top_k` (0 = off), `top_p` (1 = off), `min_p` (0 = off)."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @classmethod
    def of(cls, top_k: int | None, top_p: float | None, min_p: float | None) -> "SamplingTruncation":
        return cls(top_k=int(top_k or 0), top_p=1.0 if top_p is None else float(top_p), min_p=float(min_p or 0.0))

    @property
    def active(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def kept_tokens(
    scaled_logits: torch.Tensor, truncation: SamplingTruncation, sampled: torch.Tensor | None = None
) -> torch.Tensor:
    """`(..., V)` bool: the tokens the sampler keeps, from temperature-scaled logits; `sampled` (`(...)`) always kept."""
    logits = scaled_logits.float()
    keep = torch.ones_like(logits, dtype=torch.bool)
    if truncation.min_p > 0.0:
        log_probs = torch.log_softmax(logits, dim=-1)
        keep &= log_probs >= log_probs.amax(dim=-1, keepdim=True) + torch.log(torch.tensor(truncation.min_p))
    if 0 < truncation.top_k < logits.size(-1):
        kth = torch.topk(logits.masked_fill(~keep, float("-inf")), truncation.top_k, dim=-1).values[..., -1:]
        keep &= logits >= kth
    if truncation.top_p < 1.0:
        ascending, order = logits.masked_fill(~keep, float("-inf")).sort(dim=-1)
        cumulative = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
        dropped = cumulative <= 1.0 - truncation.top_p
        dropped[..., -1] = False
        keep &= ~torch.zeros_like(dropped).scatter(-1, order, dropped)
    if sampled is not None:
        keep.scatter_(-1, sampled.unsqueeze(-1).long(), True)
    return keep


def truncated_log_softmax(scaled_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the kept tokens; the others get the dtype's lowest value (probability 0, finite, so that
    entropies and gradients stay NaN-free)."""
    logits = scaled_logits.float()
    return torch.log_softmax(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), dim=-1)


def replayed_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    truncation: SamplingTruncation,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of `tokens` (`(B, T)`) under the truncated, renormalised distribution of `logits` (`(B, T, V)`, the
    logits that predict each token), and optionally that distribution's entropy."""
    scaled = logits.float() / temperature
    keep = kept_tokens(scaled, truncation, sampled=tokens)
    log_probs = truncated_log_softmax(scaled, keep)
    token_logps = log_probs.gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)
    entropy = None
    if compute_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logps, entropy


def replayed_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int,
    temperature: float,
    truncation: SamplingTruncation,
    compute_entropy: bool,
    autocast,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's log-probs of the last `logits_to_keep` tokens over the tokens its own sampler would keep
    (`replayed_logprobs`), from the logits, in chunks of `batch_size` rows; `autocast` is the context of the forward
    (the accelerator's). Returns `(logps, entropies or None)`, `(B, logits_to_keep)` each."""
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1).logits
        chunk_logps, chunk_entropy = replayed_logprobs(
            logits[:, :-1], ids[:, -logits_to_keep:], temperature, truncation, compute_entropy
        )
        logps.append(chunk_logps)
        entropies.append(chunk_entropy)
    return torch.cat(logps), torch.cat(entropies) if compute_entropy else None


def truncated_sampling_warning(args, replayed: bool) -> str | None:
    """The warning for a ratio against a truncated / reshaped sampler whose truncation the numerator does not replay
    (`top_p`, `top_k`, `min_p` without replay; `repetition_penalty` always), or `None` when the ratio is unbiased."""
    reshaped = []
    if not replayed:
        if args.top_p is not None and args.top_p < 1.0:
            reshaped.append(f"top_p={args.top_p}")
        if args.top_k is not None and args.top_k > 0:
            reshaped.append(f"top_k={args.top_k}")
        if args.min_p:
            reshaped.append(f"min_p={args.min_p}")
    if args.repetition_penalty != 1.0:
        reshaped.append(f"repetition_penalty={args.repetition_penalty}")
    if not reshaped:
        return None
    return (
        f"off_policy_correction={args.off_policy_correction!r} with {', '.join(reshaped)}: completions are sampled "
        "from a truncated/reshaped distribution, but the trainer's log-probs (the numerator) are those of the full "
        "temperature-scaled distribution, so the importance ratio is biased on the tokens the truncation changed. "
        "Use top_p=1, top_k=0, or sampling_mask_replay=True for top_p / top_k / min_p, for an unbiased ratio."
    )
