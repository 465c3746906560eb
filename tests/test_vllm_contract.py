"""vLLM rollouts on CPU: TRL's real `VLLMGeneration.sync_weights` and generate contract, backed by a fake engine."""

import pytest
import torch
from peft import LoraConfig

from alp_trl import ALPConfig
from alp_trl.perturbation import MODULE_NAME

from .doubles import attach_fake_vllm
from .helpers import build_trainer, named_params


def _trainer(make_model, tokenizer, prompt_dataset, train_args, peft=False, **kwargs):
    args = ALPConfig(**train_args, perturb_sigma_init=0.1, **kwargs)
    return build_trainer(
        make_model(),
        tokenizer,
        prompt_dataset,
        args,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
    )


@pytest.mark.parametrize("peft", [False, True])
def test_engine_logprobs_are_the_denominator_and_sigma_never_syncs(
    make_model, tokenizer, prompt_dataset, train_args, peft
):
    trainer = _trainer(make_model, tokenizer, prompt_dataset, train_args, peft=peft)
    engine = attach_fake_vllm(trainer, logit_noise=0.7)
    trainer.model.train()
    output = trainer._generate_and_score_completions([prompt_dataset[0]] * 4)

    # the weight sync ran through TRL's own code: every engine weight, and never sigma
    assert engine.loaded_names and not any(MODULE_NAME in name for name in engine.loaded_names)
    assert set(engine.loaded_names) == {n for n, _ in engine.engine_model.named_parameters()}
    assert hasattr(trainer.model, MODULE_NAME), "the perturbation is back after the sync"
    # the denominator is exactly what the engine reported, not a recomputation by the trainer
    mask = output["completion_mask"].bool()
    reported = torch.zeros_like(output["sampling_per_token_logps"])
    for row, values in enumerate(engine.returned_logprobs):
        reported[row, : len(values)] = torch.tensor(values)
    torch.testing.assert_close(output["sampling_per_token_logps"][mask], reported[mask], rtol=0, atol=0)
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    with torch.no_grad():
        policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, mask.size(1))[0]
    assert (policy - output["sampling_per_token_logps"])[mask].abs().mean() > 0.05
    # TRL's own vLLM importance-sampling correction does not stack on ALP's
    assert trainer.args.vllm_importance_sampling_correction is False
    assert "importance_sampling_ratio" not in output
    assert trainer.perturbation.num_noise_calls == 0


@pytest.mark.parametrize(
    ("correction", "level"), [("alp", "token"), ("alp", "sequence"), ("token_mis", "token"), ("tis", "sequence")]
)
def test_nan_engine_logprobs_are_neutralised_and_counted(
    make_model, tokenizer, prompt_dataset, train_args, correction, level
):
    """vLLM's unscorable tokens (NaN) count as ratio 1 against the current (perturbed) policy: the loss equals the loss
    of the same batch with those slots filled with that policy's own log-probs; their fraction is logged exactly."""
    trainer = _trainer(
        make_model,
        tokenizer,
        prompt_dataset,
        train_args,
        off_policy_correction=correction,
        importance_sampling_level=level,
    )
    attach_fake_vllm(trainer, nan_every=3)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    output = trainer._generate_and_score_completions([prompt_dataset[0]] * 4)
    rollout, mask = output["sampling_per_token_logps"], output["completion_mask"].bool()
    nan = torch.isnan(rollout) & mask
    assert nan.any() and not nan[mask].all()
    assert trainer._metrics["train"]["alp/rollout_logp_nan_frac"][-1] == pytest.approx(
        nan.sum().item() / mask.sum().item()
    )
    loss = trainer._compute_loss(trainer.model, output)
    assert torch.isfinite(loss)
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    with trainer._perturbed("train"), torch.no_grad():  # the same noise key as the loss's forward
        perturbed = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, mask.size(1))[0]
    filled = dict(output, sampling_per_token_logps=torch.where(torch.isnan(rollout), perturbed, rollout))
    torch.testing.assert_close(trainer._compute_loss(trainer.model, filled), loss, atol=1e-6, rtol=0)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("peft", [False, True])
def test_training_with_the_engine_updates_weights_sigma_and_the_engine(
    make_model, tokenizer, prompt_dataset, train_args, peft
):
    trainer = _trainer(make_model, tokenizer, prompt_dataset, train_args, peft=peft, perturb_lr=0.05)
    engine = attach_fake_vllm(trainer, logit_noise=0.3)
    before, sigma = named_params(trainer.model), trainer.perturbation.sigma.clone()
    engine_before = {n: p.clone() for n, p in engine.engine_model.named_parameters()}
    trainer.train()
    after = named_params(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before if MODULE_NAME not in n)
    assert not torch.equal(trainer.perturbation.sigma, sigma)
    # step 2 synced the updated (for LoRA: merged) weights into the engine, still without sigma
    assert any(not torch.equal(engine_before[n], p) for n, p in engine.engine_model.named_parameters())
    assert not any(MODULE_NAME in name for name in engine.loaded_names)
    first = trainer.state.log_history[0]
    assert first["alp/ratio/p99"] > 1 and first["alp/train_rollout_kl"] > 0, "the engine's noise shows in the ratio"


def test_engine_that_dies_mid_run_stops_training_with_the_reason(make_model, tokenizer, prompt_dataset, train_args):
    """The engine stops answering at the second generation (a server gone: a connection error): training stops with
    an `EngineFailure` that names the engine and the last checkpoint, which is complete and intact."""
    import os

    import requests

    from alp_trl.vllm_engine import EngineFailure

    args = {**train_args, "max_steps": 3, "save_strategy": "steps", "save_steps": 1}
    trainer = _trainer(make_model, tokenizer, prompt_dataset, args, vllm_mode="server")
    engine = attach_fake_vllm(trainer)
    calls = {"n": 0}
    real_generate = trainer.vllm_generation.generate

    def dying_generate(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise requests.exceptions.ConnectionError("Connection refused")
        return real_generate(*a, **kw)

    trainer.vllm_generation.generate = dying_generate
    with pytest.raises(EngineFailure, match=r"vLLM server.*ConnectionError: Connection refused.*checkpoint-1"):
        trainer.train()
    checkpoint = os.path.join(args["output_dir"], "checkpoint-1")
    assert {"model.safetensors", "alp_perturbation.safetensors", "trainer_state.json"} <= set(os.listdir(checkpoint))
    assert engine.loaded_names  # the first generation ran against the engine
