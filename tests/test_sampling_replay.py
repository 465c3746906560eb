"""Sampling-mask replay: the kept set of a truncated sampler, the renormalised log-probs, and the trainer's ratio."""

import math

import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from alp_trl import ALPConfig
from alp_trl.sampling_replay import SamplingTruncation, kept_tokens, replayed_logprobs, truncated_log_softmax

from .helpers import build_trainer


def _transformers_kept(logits, truncation):
    """The tokens transformers' own warpers leave finite (its order: top-k, top-p, then min-p)."""
    scores = logits.clone()
    if truncation.top_k:
        scores = TopKLogitsWarper(truncation.top_k)(None, scores)
    if truncation.top_p < 1:
        scores = TopPLogitsWarper(truncation.top_p)(None, scores)
    if truncation.min_p:
        scores = MinPLogitsWarper(truncation.min_p)(None, scores)
    return torch.isfinite(scores)


def test_kept_set_by_hand():
    # probabilities 0.5, 0.25, 0.125, 0.125: top_p 0.7 keeps the two likeliest (cumulative ascending 0.125, 0.25,
    # 0.5, 1.0: the tokens at <= 0.3 go); top_k 3 keeps the three largest; min_p 0.3 keeps p >= 0.15
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.125, 0.125]]))
    assert kept_tokens(logits, SamplingTruncation(top_p=0.7)).tolist() == [[True, True, False, False]]
    assert kept_tokens(logits, SamplingTruncation(top_k=1)).tolist() == [[False, True, False, False]]
    assert kept_tokens(logits, SamplingTruncation(min_p=0.3)).tolist() == [[True, True, False, False]]
    # the sampled token stays in, whatever the rule says
    kept = kept_tokens(logits, SamplingTruncation(top_k=1), sampled=torch.tensor([2]))
    assert kept.tolist() == [[False, True, True, False]]
    log_probs = truncated_log_softmax(logits, kept_tokens(logits, SamplingTruncation(top_p=0.7)))
    assert log_probs[0, :2].tolist() == pytest.approx([math.log(1 / 3), math.log(2 / 3)], abs=1e-6)
    assert log_probs[0, 2:].exp().tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "truncation",
    [
        SamplingTruncation(top_p=0.8),
        SamplingTruncation(top_k=7),
        SamplingTruncation(top_k=20, top_p=0.9),
        SamplingTruncation(min_p=0.05),
    ],
)
def test_kept_set_is_the_samplers(truncation):
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3
    assert torch.equal(kept_tokens(logits, truncation), _transformers_kept(logits, truncation))


def test_replayed_logprobs_entropy_and_gradient():
    torch.manual_seed(1)
    logits = (torch.randn(2, 5, 50) * 2).requires_grad_()
    tokens = torch.randint(0, 50, (2, 5))
    truncation = SamplingTruncation(top_p=0.6)
    logps, entropy = replayed_logprobs(logits, tokens, 0.7, truncation, compute_entropy=True)
    scaled = logits.detach() / 0.7
    keep = kept_tokens(scaled, truncation, sampled=tokens)
    probs = torch.where(keep, scaled.exp(), torch.zeros_like(scaled))
    probs = probs / probs.sum(-1, keepdim=True)
    assert torch.allclose(logps, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log(), atol=1e-5)
    manual_entropy = -(probs * torch.where(keep, probs.log(), torch.zeros_like(probs))).sum(-1)
    assert torch.allclose(entropy, manual_entropy, atol=1e-5)
    (logps.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    # tokens outside the kept set get no gradient: they are not part of the distribution
    dropped = ~keep
    assert dropped.any() and logits.grad[dropped].abs().max() == 0


@pytest.mark.parametrize("replay", [True, False])
def test_trainer_replays_the_truncation_on_both_sides(make_model, tokenizer, prompt_dataset, train_args, replay):
    """Transformers generation at top_p 0.7. With replay, the recorded denominator is the truncated distribution's
    log-prob (above the full distribution's by -log(kept mass)) and the numerator replays the same truncation: the
    ratio is 1 before any update. Without it, both sides are the full distribution (TRL's convention)."""
    from alp_trl import ALPGRPOTrainer

    args = ALPConfig(
        **{**train_args, "max_completion_length": 12},
        off_policy_correction="bypass",
        top_p=0.7,
        temperature=0.9,
        sampling_mask_replay=replay,
    )
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    trainer.model.train()
    output = trainer._generate_and_score_completions([prompt_dataset[i] for i in range(4)])
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    mask = output["completion_mask"].bool()
    with torch.no_grad():
        policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, mask.size(1))[0]
        full = super(ALPGRPOTrainer, trainer)._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, mask.size(1)
        )[0]
    rollout = output["sampling_per_token_logps"]
    assert (policy - rollout)[mask].abs().max() < 1e-4
    if replay:
        renormalisation = (rollout - full)[mask]  # -log(kept mass) >= 0 on every token
        assert (renormalisation >= -1e-5).all() and renormalisation.mean() > 0.05
    else:
        assert (rollout - full)[mask].abs().max() < 1e-4
