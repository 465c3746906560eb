"""The rollout-mismatch simulator: a different sampling policy, restored exactly, whose log-probs are the rollout's."""

import copy

import pytest
import torch

from alp_trl import ALPConfig
from alp_trl.simulated_engine import simulated_sampler

from .helpers import build_trainer


@pytest.fixture
def batch(tokenizer):
    return tokenizer(["What is 2 + 3?", "Compute 7 * 6 now"], return_tensors="pt", padding=True)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(
    ("kind", "std"),
    [("bf16", 0.0), ("fp16", 0.0), ("bf16_activations", 0.0), ("logit_noise", 0.5), ("hidden_noise", 0.05)],
)
def test_sampler_differs_inside_and_is_restored_exactly(make_model, batch, kind, std):
    model = make_model().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clean = _logits(model, batch)
    with simulated_sampler(model, kind, std, seed=1, step=3):
        inside = _logits(model, batch)
    with simulated_sampler(model, kind, std, seed=1, step=3):
        again = _logits(model, batch)
    assert (inside - clean).abs().max() > 1e-4
    torch.testing.assert_close(inside, again, rtol=0, atol=0)  # reproducible from (seed, step)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())  # buffers too
    assert torch.equal(_logits(model, batch), clean)


def test_bf16_sampler_equals_a_rounded_copy(make_model, batch):
    model = make_model().eval()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    with simulated_sampler(model, "bf16"):
        torch.testing.assert_close(_logits(model, batch), _logits(rounded, batch), rtol=0, atol=0)


def test_none_is_a_no_op_and_unknown_kind_is_refused(make_model, batch):
    model = make_model().eval()
    with simulated_sampler(model, "none"):
        assert torch.equal(_logits(model, batch), _logits(make_model().eval(), batch))
    with pytest.raises(ValueError, match="rollout_mismatch"):
        with simulated_sampler(model, "int4"):
            pass


@pytest.mark.parametrize("correction", ["alp", "none"])
def test_trainer_rollout_logps_come_from_the_simulated_engine(
    make_model, tokenizer, prompt_dataset, train_args, correction
):
    args = ALPConfig(
        **train_args,
        rollout_mismatch="logit_noise",
        rollout_mismatch_std=1.0,
        off_policy_correction=correction,
        perturb_sigma_init=0.1,
    )
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    trainer.model.train()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    output = trainer._generate_and_score_completions([prompt_dataset[0]] * 4)
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in weights.items())
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    T = output["completion_ids"].size(1)
    clean = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)[0].detach()
    completion_mask = output["completion_mask"].bool()
    gap = (output["sampling_per_token_logps"] - clean)[completion_mask].abs()
    assert gap.mean() > 0.05, "the rollout log-probs are the noisy engine's, not the policy's"
    metrics = trainer._metrics["train"]
    assert metrics["rollout_mismatch/logp_abs_diff_mean"][-1] == pytest.approx(gap.mean().item(), rel=1e-4)
    assert metrics["rollout_mismatch/kl_k3"][-1] > 0
    if correction == "alp":
        assert trainer.perturbation.num_noise_calls == 0


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_weights_are_restored_bit_for_bit_when_generation_raises(make_model, kind):
    """An exception inside the simulated engine's generation (or half-way through rounding) never leaves the live
    policy's weights rounded."""
    from alp_trl import rollout_mismatch

    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="generation failed"):
        with rollout_mismatch.simulated_sampler(model, kind):
            assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), "rounded inside"
            raise RuntimeError("generation failed")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    # interrupted during the rounding itself: the third parameter's copy raises
    params = list(model.parameters())
    calls = {"n": 0}
    original_copy = torch.Tensor.copy_

    def failing_copy(self, src, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_copy(self, src, *args, **kwargs)

    torch.Tensor.copy_ = failing_copy
    try:
        with pytest.raises(KeyboardInterrupt):
            with rollout_mismatch.simulated_sampler(model, kind):
                pass
    finally:
        torch.Tensor.copy_ = original_copy
    assert len(params) > 3 and all(torch.equal(before[n], p) for n, p in model.named_parameters())
