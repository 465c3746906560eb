"""`alp-trl diagnose` (`alp_trl.intervention`) on a tiny checkpoint: envelopes before and after the one-step
intervention, files written; its update equals the trainer's. (The ratio statistics it reports:
tests/test_ratio_statistics.py.)"""

import json
import shutil

import pytest
import torch

from alp_trl.intervention import main as diagnose_main
from alp_trl.perturbation import LayerwisePerturbation
from alp_trl.tiny_models import build_tiny_causal_lm


def test_diagnose_end_to_end_on_a_checkpoint_with_sigma(tmp_path, saved_model_dir, tokenizer, monkeypatch):
    # a random tiny model never answers right: grade by parity of the length so that groups get mixed rewards
    import alp_trl.rewards

    monkeypatch.setattr(alp_trl.rewards, "grade", lambda text, answer, *a: (float(len(text) % 2), "ok"))
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(saved_model_dir, checkpoint)
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer))
    perturbation = LayerwisePerturbation.attach(model, [0, 2], sigma_init=0.3)
    perturbation.save(str(checkpoint))
    report = diagnose_main(
        [
            str(checkpoint),
            "--num-prompts",
            "2",
            "--num-generations",
            "3",
            "--max-new-tokens",
            "6",
            "--rollout-mismatch",
            "logit_noise",
            "--rollout-mismatch-std",
            "0.5",
            "--update-lr",
            "1e-2",
        ]
    )
    out = checkpoint / "diagnose"
    assert (out / "diagnose.png").exists()
    saved = json.loads((out / "diagnose.json").read_text())
    assert saved["sigma_source"].startswith("checkpoint")
    assert saved["sigma_per_layer"] == {"0": pytest.approx(0.3), "2": pytest.approx(0.3)}
    assert saved["num_sequences"] == 6 and saved["mismatch"]["logp_abs_diff_mean"] > 0.01
    checkpoint_rows = report["summary"]["checkpoint"]
    assert checkpoint_rows["unperturbed"]["kl_k3"] != checkpoint_rows["perturbed (ALP)"]["kl_k3"]
    after = report["summary"]["after one update"]
    assert set(after) == {"Bypass update (its ratio)", "ALP update: perturbed (its ratio)", "ALP update: unperturbed"}
    assert (
        after["Bypass update (its ratio)"]["kl_k3"] != checkpoint_rows["unperturbed"]["kl_k3"]
    )  # the update moved it
    assert all(report["envelope"]["checkpoint"]["unperturbed"])


def test_successive_updates_from_a_restored_state_are_independent():
    """Gradients left by one update must not leak into the next (they did: the ALP update of `diagnose` and every
    update of a study after the first carried the previous updates' gradients)."""
    from alp_trl.intervention import RolloutBatch, one_update

    model = build_tiny_causal_lm("qwen2", vocab_size=64, num_layers=2, hidden_size=16)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 64, (4, 5), generator=g)
    completion = torch.randint(3, 64, (4, 6), generator=g)
    batch = RolloutBatch(
        prompt, torch.ones_like(prompt), completion, torch.ones_like(completion), torch.full((4, 6), -4.0)
    )
    first, second = [torch.tensor([1.0, -1.0, 0.5, -0.5])], [torch.tensor([-0.2, 0.9, -1.0, 0.3])]

    def update(advantages):
        model.load_state_dict(start)
        one_update(model, None, [batch], advantages, 1e-2, 1.0, perturbed=False)
        assert all(p.grad is None for p in model.parameters()), "no gradient left behind"
        return {k: v.clone() for k, v in model.state_dict().items()}

    alone = update(second)
    update(first)
    after_another = update(second)
    assert all(torch.equal(alone[k], after_another[k]) for k in alone)


def test_rollout_batches_pad_to_one_width_and_give_the_policy_logps_by_field():
    from alp_trl.intervention import RolloutBatch, completion_logps, pad_batches, policy_logps

    model = build_tiny_causal_lm("qwen2", vocab_size=64, num_layers=2, hidden_size=16)
    g = torch.Generator().manual_seed(0)

    def batch(width):
        prompt, completion = torch.randint(3, 64, (2, 4), generator=g), torch.randint(3, 64, (2, width), generator=g)
        return RolloutBatch(
            prompt_ids=prompt,
            prompt_mask=torch.ones_like(prompt),
            completion_ids=completion,
            completion_mask=torch.ones_like(completion),
            rollout_logps=torch.full((2, width), -1.0),
        )

    short, wide = pad_batches([batch(3), batch(5)])
    assert isinstance(short, RolloutBatch) and short.completion_ids.shape == (2, 5)
    assert short.completion_mask[:, 3:].sum() == 0 and short.rollout_logps[:, 3:].abs().sum() == 0, "zero padding"
    assert torch.equal(short.prompt_ids, short.to("cpu").prompt_ids), "prompts are not padded"
    logps = policy_logps(model, [short, wide], None, 1.0)
    by_hand = completion_logps(model, *wide[:4], 1.0)
    assert logps.shape == (4, 5) and not logps.requires_grad
    torch.testing.assert_close(logps[2:], by_hand.detach())


@pytest.mark.parametrize("correction", ["alp", "bypass", "token_mis", "seq_mis", "tis", "seq_tis", "ppo"])
def test_diagnose_update_loss_equals_the_trainers_loss(make_model, tokenizer, prompt_dataset, tmp_path, correction):
    """`alp-trl diagnose` / the study optimise the trainer's objective: for every correction, the loss of
    `intervention.update_loss` with `PolicyLossSettings.from_config(config)` equals `ALPGRPOTrainer._compute_loss` on
    the same batch (same noise under ALP), and so do the gradients."""
    from alp_trl.intervention import RolloutBatch, update_loss
    from alp_trl.objectives import PolicyLossSettings

    from .helpers import build_trainer, tiny_config

    config = tiny_config(
        tmp_path,
        off_policy_correction=correction,
        epsilon=0.1,
        epsilon_high=0.15,
        dual_clip_c=3.0,
        mis_threshold=1.5,
        perturb_sigma_init=0.05,
    )
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, config)
    model = trainer.model
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 200, (4, 5), generator=g)
    completion = torch.randint(3, 200, (4, 6), generator=g)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 4:] = 0
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[2, :2] = 0
    with torch.no_grad():
        from alp_trl.intervention import completion_logps

        current = completion_logps(model, prompt, prompt_mask, completion, completion_mask, 1.0)
    rollout = current + 0.5 * torch.randn(current.shape, generator=g)  # an engine far enough off for MIS / TIS
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.7])
    inputs = {
        "prompt_ids": prompt,
        "prompt_mask": prompt_mask,
        "completion_ids": completion,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "sampling_per_token_logps": rollout,
        "num_items_in_batch": completion_mask.sum().float(),
    }
    if config.correction.reads_old_logps:
        inputs["old_per_token_logps"] = current

    model.train()
    trainer.current_gradient_accumulation_steps = 1
    model.zero_grad(set_to_none=True)
    trained = trainer._compute_loss(model, inputs)
    trained.backward()
    trainer_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    batch = RolloutBatch(prompt, prompt_mask, completion, completion_mask, rollout)
    settings = PolicyLossSettings.from_config(config)
    noise_key = (0, 0) if correction == "alp" else None  # the trainer's noise at optimizer step 0, micro-step 0
    diagnosed = update_loss(
        model, trainer.perturbation, batch, advantages, settings, completion_mask.sum().item(), 1.0, noise_key
    )
    diagnosed.backward()
    torch.testing.assert_close(diagnosed, trained, atol=1e-6, rtol=1e-5)
    assert trained.abs() > 1e-4, "a loss that is not trivially 0"
    for name, grad in trainer_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-4, msg=name)
    if correction == "alp":  # the noise matters: without it the loss differs
        plain = update_loss(
            model, trainer.perturbation, batch, advantages, settings, completion_mask.sum().item(), 1.0
        )
        assert (plain - trained).abs() > 1e-5


def test_policy_loss_settings_default_to_alpconfig(tmp_path):
    """The diagnose default (`PolicyLossSettings()`) is `ALPConfig`'s default objective, value by value."""
    from alp_trl.objectives import PolicyLossSettings

    from .helpers import tiny_config

    assert PolicyLossSettings.from_config(tiny_config(tmp_path)) == PolicyLossSettings(max_completion_length=8)


def test_sgd_update_moves_each_weight_by_its_gradient():
    """`one_update(optimizer="sgd")` is plain gradient descent on `update_loss`: every weight moves by -lr x its
    gradient (an AdamW first step moves each by ~lr whatever its gradient); two steps differ from one."""
    from alp_trl.intervention import RolloutBatch, one_update, update_loss
    from alp_trl.objectives import PolicyLossSettings

    model = build_tiny_causal_lm("qwen2", vocab_size=64, num_layers=2, hidden_size=16)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    prompt, completion = torch.randint(3, 64, (4, 5), generator=g), torch.randint(3, 64, (4, 6), generator=g)
    batch = RolloutBatch(
        prompt, torch.ones_like(prompt), completion, torch.ones_like(completion), torch.full((4, 6), -4.0)
    )
    advantages = [torch.tensor([1.0, -1.0, 0.5, -0.5])]
    settings = PolicyLossSettings(off_policy_correction="bypass")
    model.train()
    update_loss(model, None, batch, advantages[0], settings, 24, 1.0).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    one_update(model, None, [batch], advantages, 0.5, 1.0, perturbed=False, optimizer="sgd")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), start[name] - 0.5 * grads[name], atol=1e-6, rtol=1e-5, msg=name)
    one_step = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    one_update(model, None, [batch], advantages, 0.5, 1.0, perturbed=False, optimizer="sgd", steps=2)
    assert any(not torch.equal(v, one_step[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"allowed values are \['adamw', 'sgd'\]"):
        one_update(model, None, [batch], advantages, 0.5, 1.0, perturbed=False, optimizer="lion")
