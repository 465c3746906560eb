"""The marginal-coverage test's math (alp_trl.marginal_coverage), by hand and on the tiny model."""

import math

import pytest
import torch

from alp_trl.intervention import RolloutBatch, pad_batches, sample_rollouts
from alp_trl.marginal_coverage import (
    averaged_log_probs,
    completion_log_probs,
    coverage,
    exact_kl,
    kl_to_inference,
    matched_sigma,
    matched_temperature,
    mean_entropy,
)
from alp_trl.perturbation import LayerwisePerturbation
from alp_trl.tiny_models import build_tiny_causal_lm


def _batch(seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (3, 4), generator=g)
    completion = torch.randint(3, vocab, (3, 5), generator=g)
    mask = torch.ones_like(completion)
    mask[2, 3:] = 0
    return RolloutBatch(prompt, torch.ones_like(prompt), completion, mask, torch.full((3, 5), -3.0))


def test_kl_to_inference_by_hand():
    logps = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.1), 0.0]])
    rollout = torch.tensor([[math.log(0.25), math.log(0.4)], [math.log(0.1), float("nan")]])
    mask = torch.tensor([[1, 1], [1, 1]])
    kl = kl_to_inference(logps, rollout, mask)  # the NaN token is left out
    log_r = [math.log(2.0), math.log(0.5), 0.0]
    assert kl["count"] == 3
    assert kl["kl_k1"] == pytest.approx(-sum(log_r) / 3)
    assert kl["kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in log_r) / 3)


def test_exact_kl_and_entropy_by_hand():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    q = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]).log()
    mask = torch.tensor([[1, 0]])
    assert exact_kl(p, q, mask) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert mean_entropy(p, mask) == pytest.approx(math.log(2))


def test_averaged_log_probs_is_the_log_of_the_mean_distribution():
    model = build_tiny_causal_lm("qwen2", vocab_size=64, num_layers=2, hidden_size=16)
    batch = _batch()
    perturbation = LayerwisePerturbation.attach(model, sigma_init=0.5, learnable=False, seed=3)
    averaged, first = averaged_log_probs(model, perturbation, batch, draws=3, key=10)
    draws = []
    for k in range(3):
        with perturbation.active(step=10 + k):
            draws.append(completion_log_probs(model, batch).exp())
    torch.testing.assert_close(averaged.exp(), torch.stack(draws).mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first.exp(), draws[0])
    assert not torch.allclose(draws[0], draws[1]), "the draws differ"
    torch.testing.assert_close(averaged.exp().sum(-1), torch.ones(averaged.shape[:2]))


def test_matched_temperature_reaches_the_target_entropy():
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(3 * torch.randn(2, 4, 50, generator=g), -1)
    mask = torch.ones(2, 4)
    own = mean_entropy(log_probs, mask)
    assert matched_temperature(log_probs, mask, own) == pytest.approx(1.0, rel=1e-4)
    target = own + 0.5
    temperature = matched_temperature(log_probs, mask, target)
    assert temperature > 1.0
    assert mean_entropy(torch.log_softmax(log_probs / temperature, -1), mask) == pytest.approx(target, abs=1e-4)


def test_matched_sigma_recovers_the_noise_of_a_hidden_noise_engine(tokenizer):
    """The engine's scale: for an engine that IS hidden-state noise of std s, the sigma whose single draw is as far
    from the policy as the engine comes out near s (an independent draw of the same noise)."""
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer), num_layers=2, hidden_size=32).eval()
    prompts = ["What is 3 + 4?", "Compute 12 - 5.", "Calculate 6 * 7."]
    std = 0.3
    batches = pad_batches(sample_rollouts(model, tokenizer, prompts, 4, 8, 1.0, "hidden_noise", std, 0, 12))
    unperturbed = torch.cat([completion_log_probs(model, b) for b in batches])
    tokens = torch.cat([b.completion_ids for b in batches])
    target = kl_to_inference(
        unperturbed.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        torch.cat([b.rollout_logps for b in batches]),
        torch.cat([b.completion_mask for b in batches]),
    )["kl_k3"]
    sigma = matched_sigma(
        model, lambda s: LayerwisePerturbation.attach(model, sigma_init=s, learnable=False, seed=1), batches, target
    )
    assert std / 2 < sigma < 2 * std
    assert not hasattr(model, "alp_perturbation"), "every trial perturbation is detached"


def test_coverage_of_a_zero_sigma_is_the_unperturbed_policy():
    """With sigma ~0 the averaged policy and one draw are the policy itself, and the entropy-matched temperature is 1."""
    model = build_tiny_causal_lm("qwen2", vocab_size=64, num_layers=2, hidden_size=16)
    batches = pad_batches([_batch(0), _batch(1)])
    perturbation = LayerwisePerturbation.attach(model, sigma_init=1e-12, learnable=False, seed=0)
    result = coverage(model, perturbation, batches, draws=2, key=0)
    for name in ("averaged", "one_draw", "temperature"):
        assert result[name].kl_k3 == pytest.approx(result["unperturbed"].kl_k3, rel=1e-4)
    assert result["temperature_T"] == pytest.approx(1.0, rel=1e-3)
    assert result["unperturbed"].count == 2 * int(batches[0].completion_mask.sum())
    assert sum(b["count"] for b in result["unperturbed"].envelope) == result["unperturbed"].count
