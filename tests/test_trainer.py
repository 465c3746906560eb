"""ALPGRPOTrainer against plain GRPOTrainer, and end-to-end training of ALP and the baselines on tiny models."""

import json
import math
import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from trl import GRPOConfig, GRPOTrainer

from alp_trl import ALPConfig
from alp_trl.perturbation import MODULE_NAME, SIDE_FILE

from .helpers import build_trainer, named_params


def _fixed_inputs(tokenizer, batch=4, prompt_len=6, completion_len=5):
    """A hand-made training micro-batch: left-padded prompts, right-padded completions, mixed-sign advantages."""
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    prompt_ids = torch.randint(5, vocab, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[0, :2], prompt_mask[0, :2] = tokenizer.pad_token_id, 0
    completion_ids = torch.randint(5, vocab, (batch, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 3:], completion_mask[2, 4:] = 0, 0
    completion_ids[completion_mask == 0] = tokenizer.pad_token_id
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.3, -1.2]),
        "num_items_in_batch": completion_mask.sum(),
    }


def _current_logps(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, inputs["completion_ids"].size(1))[
            0
        ]


def _grpo_and_noise_free_alp(model, tokenizer, dataset, common: dict):
    """A `GRPOTrainer` and an `ALPGRPOTrainer` with sigma = 0 (fixed) and no dual clip, on the same settings."""
    grpo = build_trainer(model, tokenizer, dataset, GRPOConfig(**common), trainer_class=GRPOTrainer)
    alp = build_trainer(
        model,
        tokenizer,
        dataset,
        ALPConfig(perturb_sigma_init=0.0, perturb_sigma_learnable=False, dual_clip_c=None, **common),
    )
    return grpo, alp


def _shifted(current, offset: float):
    """`current` shifted so that ratios differ from 1 and clipping fires (the row bias moves rows 0 (A > 0) and 1
    (A < 0) of `_fixed_inputs` out of the clip range at sequence level too)."""
    row_bias = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]])
    return offset * (torch.sin(torch.arange(current.numel(), dtype=current.dtype)).view_as(current) + row_bias)


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    ("loss_type", "beta", "offset"),
    [
        ("dapo", 0.0, 0.0),
        ("dapo", 0.0, 0.3),
        ("grpo", 0.04, 0.3),
        ("bnpo", 0.0, 0.3),
        ("dr_grpo", 0.0, 0.3),
        ("luspo", 0.0, 0.3),
    ],
)
def test_zero_sigma_alp_equals_grpo(
    saved_model_dir, tokenizer, prompt_dataset, train_args, level, loss_type, beta, offset
):
    """sigma = 0 and rollout denominator = GRPO's old policy: identical loss and gradients (tolerance 1e-6)."""
    common = dict(train_args, importance_sampling_level=level, loss_type=loss_type, beta=beta, epsilon_high=0.28)
    grpo, alp = _grpo_and_noise_free_alp(saved_model_dir, tokenizer, prompt_dataset, common)
    assert alp.perturbation is not None
    inputs = _fixed_inputs(tokenizer)
    current = _current_logps(grpo, inputs)
    # denominator = the current policy (offset 0), or shifted so that ratios differ from 1 and clipping is exercised
    shift = _shifted(current, offset)
    denominator = current + shift
    if beta:
        inputs["ref_per_token_logps"] = current - 0.2 * shift
    grpo_loss, grpo_grads = _loss_and_grads(grpo, {**inputs, "old_per_token_logps": denominator})
    alp_loss, alp_grads = _loss_and_grads(alp, {**inputs, "sampling_per_token_logps": denominator})
    torch.testing.assert_close(alp_loss, grpo_loss, atol=1e-6, rtol=0)
    assert grpo_grads.keys() == alp_grads.keys() and len(grpo_grads) > 10
    for name, grad in grpo_grads.items():
        torch.testing.assert_close(alp_grads[name], grad, atol=1e-6, rtol=0, msg=name)
    if offset:
        # clipping really was exercised, and is counted as TRL counts it (tokens, or sequences at sequence level)
        for key in (
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "clip_ratio/region_mean",
            "clip_ratio/low_min",
            "clip_ratio/high_max",
        ):
            assert alp._metrics["train"][key][-1] == pytest.approx(grpo._metrics["train"][key][-1]), key
        assert grpo._metrics["train"]["clip_ratio/region_mean"][-1] > 0


def test_positive_sigma_changes_log_probs_and_gets_gradient(make_model, tokenizer, prompt_dataset, train_args):
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args, perturb_sigma_init=0.1))
    inputs = _fixed_inputs(tokenizer)
    clean = _current_logps(trainer, inputs)
    trainer.model.train()
    with trainer._perturbed("train"):
        noisy = _current_logps(trainer, inputs)
    assert (noisy - clean).abs().max() > 1e-3
    _, grads = _loss_and_grads(trainer, {**inputs, "sampling_per_token_logps": clean})
    assert grads[f"{MODULE_NAME}.log_sigma"].abs().sum() > 0


@pytest.mark.parametrize("lora", [False, True])
def test_noise_never_reaches_generation_reference_or_eval(
    saved_model_dir, tokenizer, prompt_dataset, train_args, lora
):
    """Also with LoRA, where the reference forward is the same model with the adapter disabled."""
    peft = {"peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])} if lora else {}
    trainer = build_trainer(
        saved_model_dir, tokenizer, prompt_dataset, ALPConfig(**train_args, perturb_sigma_init=1.0, beta=0.1), **peft
    )
    if lora:
        assert trainer.ref_model is None, "the reference is the shared model with its adapter off"
    trainer.model.train()
    batch = [prompt_dataset[0]] * 4
    output = trainer._generate_and_score_completions(batch)
    assert trainer.perturbation.num_noise_calls == 0
    # the rollout denominator (captured during generate) and the reference log-probs are the clean policy's
    clean = _current_logps(trainer, output)
    mask = output["completion_mask"].bool()
    torch.testing.assert_close(output["sampling_per_token_logps"][mask], clean[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(output["ref_per_token_logps"][mask], clean[mask], atol=1e-4, rtol=0)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.eval()
    with torch.no_grad():
        trainer._compute_loss(trainer.model, output)
    assert trainer.perturbation.num_noise_calls == 0, "no noise in eval"
    trainer.model.train()
    trainer._compute_loss(trainer.model, output)
    assert trainer.perturbation.num_noise_calls == 3, "noise on every layer of the training forward"


def test_gradient_checkpointing_on_and_off_match(saved_model_dir, tokenizer, prompt_dataset, train_args):
    grads = {}
    for gc in (False, True):
        trainer = build_trainer(
            saved_model_dir,
            tokenizer,
            prompt_dataset,
            ALPConfig(**train_args, perturb_sigma_init=0.1, gradient_checkpointing=gc),
        )
        inputs = _fixed_inputs(tokenizer)
        inputs["sampling_per_token_logps"] = _current_logps(trainer, inputs) - 0.1
        _, grads[gc] = _loss_and_grads(trainer, inputs)
    assert f"{MODULE_NAME}.log_sigma" in grads[True]
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_sigma_has_its_own_optimizer_group(make_model, tokenizer, prompt_dataset, train_args):
    trainer = build_trainer(
        make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args, perturb_lr=0.05, weight_decay=0.1)
    )
    optimizer = trainer.create_optimizer()
    sigma = trainer.perturbation.log_sigma
    groups = [g for g in optimizer.param_groups if any(p is sigma for p in g["params"])]
    assert len(groups) == 1 and groups[0]["params"] == [sigma]
    assert groups[0]["lr"] == 0.05 and groups[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(trainer.model.parameters()))


def test_requires_alp_config(make_model, tokenizer, prompt_dataset, train_args):
    with pytest.raises(TypeError, match="ALPConfig"):
        build_trainer(make_model(), tokenizer, prompt_dataset, GRPOConfig(**train_args))


def test_the_trainer_refuses_a_plain_grpo_config(make_model, tokenizer, prompt_dataset, tmp_path):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match=r"needs an ALPConfig, got GRPOConfig"):
        build_trainer(
            make_model(),
            tokenizer,
            prompt_dataset,
            GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            reward_funcs=lambda completions, **k: [0.0] * len(completions),
        )


def _assert_weights_file_has_no_sigma(directory):
    for name in ("model.safetensors", "adapter_model.safetensors"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            assert not any(MODULE_NAME in key for key in load_file(path)), f"sigma leaked into {name}"
            return
    raise AssertionError(f"no weights file in {directory}: {os.listdir(directory)}")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("use_lora", [False, True])
def test_alp_trains_end_to_end(make_model, tokenizer, prompt_dataset, train_args, arch, level, use_lora):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_lora else None
    args = ALPConfig(**train_args, importance_sampling_level=level, perturb_sigma_init=0.05, perturb_lr=0.05)
    trainer = build_trainer(
        make_model(arch),
        tokenizer,
        prompt_dataset,
        args,
        peft_config=peft_config,
    )
    before = named_params(trainer.model)
    sigma_before = trainer.perturbation.sigma.clone()
    trainer.train()
    after = named_params(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert not torch.equal(trainer.perturbation.sigma, sigma_before), "learnable sigma must move"
    if use_lora:
        assert changed and all("lora_" in n or MODULE_NAME in n for n in changed), "only LoRA and sigma train"
    else:
        assert len(changed) == len(before), "every weight and sigma train"
    logged = trainer.state.log_history[0]
    # the first step's perturbed ratio: the noise moves it off 1, its p99 is bounded by its largest |log ratio|, the
    # k3 KL is positive, the clipped share is a fraction; sigma is near its initial value after one small step
    assert 0 < logged["alp/log_ratio_abs_max"] and 0 < logged["alp/train_rollout_kl"]
    assert math.exp(-logged["alp/log_ratio_abs_max"]) <= logged["alp/ratio/p99"]
    assert logged["alp/ratio/p99"] <= math.exp(logged["alp/log_ratio_abs_max"]) + 1e-6
    assert 0 <= logged["alp/clip_frac"] <= 1
    assert logged["alp/sigma_mean"] == pytest.approx(0.05, rel=0.2)
    out = os.path.join(train_args["output_dir"], "final")
    trainer.save_model(out)
    _assert_weights_file_has_no_sigma(out)
    with open(os.path.join(out, "alp_perturbation.json")) as f:
        saved = json.load(f)
    assert saved["sigma_per_layer"]["0"] == pytest.approx(trainer.perturbation.sigma_per_layer()[0])
    assert os.path.exists(os.path.join(out, SIDE_FILE))
    assert hasattr(trainer.model, MODULE_NAME), "the perturbation is back in place after saving"


def test_frozen_sigma_does_not_move_but_weights_do(make_model, tokenizer, prompt_dataset, train_args):
    trainer = build_trainer(
        make_model(),
        tokenizer,
        prompt_dataset,
        ALPConfig(**train_args, perturb_sigma_init=0.05, perturb_sigma_learnable=False),
    )
    before = named_params(trainer.model)
    sigma_before = trainer.perturbation.sigma.clone()
    trainer.train()
    assert torch.equal(trainer.perturbation.sigma, sigma_before)
    after = named_params(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before if MODULE_NAME not in n)


@pytest.mark.parametrize("correction", ["bypass", "token_mis", "seq_mis", "tis", "none"])
def test_baselines_train_without_perturbation(make_model, tokenizer, prompt_dataset, train_args, correction):
    trainer = build_trainer(
        make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args, off_policy_correction=correction)
    )
    assert trainer.perturbation is None and not hasattr(trainer.model, MODULE_NAME)
    before = named_params(trainer.model)
    trainer.train()
    after = named_params(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    logged = trainer.state.log_history[0]
    if correction == "none":
        assert "alp/ratio/p99" not in logged
    else:
        assert "alp/ratio/p99" in logged
    if correction in ("token_mis", "seq_mis"):
        assert "alp/mis_masked_frac" in logged
    if correction == "tis":
        assert "alp/tis_truncated_frac" in logged


def test_warns_when_sampling_is_truncated_without_replay(make_model, tokenizer, prompt_dataset, train_args, caplog):
    with caplog.at_level("WARNING", logger="alp_trl.trainer"):
        build_trainer(
            make_model(),
            tokenizer,
            prompt_dataset,
            ALPConfig(**train_args, top_p=0.9, top_k=20, sampling_mask_replay=False),
        )
    assert "top_p=0.9" in caplog.text and "top_k=20" in caplog.text and "biased" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="alp_trl.trainer"):  # replayed (the default): nothing to warn about
        build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args, top_p=0.9, top_k=20))
    assert "biased" not in caplog.text
    with caplog.at_level("WARNING", logger="alp_trl.trainer"):  # a repetition penalty is never replayed
        build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args, repetition_penalty=1.1))
    assert "repetition_penalty=1.1" in caplog.text and "biased" in caplog.text


def test_lora_with_gradient_checkpointing_trains_sigma(make_model, tokenizer, prompt_dataset, train_args):
    args = ALPConfig(**train_args, gradient_checkpointing=True, perturb_sigma_init=0.05, perturb_lr=0.05)
    trainer = build_trainer(
        make_model("llama"),
        tokenizer,
        prompt_dataset,
        args,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    sigma_before = trainer.perturbation.sigma.clone()
    trainer.train()
    assert not torch.equal(trainer.perturbation.sigma, sigma_before)


def test_checkpoint_holds_sigma_beside_the_weights_and_resume_restores_it(
    make_model, tokenizer, prompt_dataset, train_args
):
    kwargs = dict(train_args, save_strategy="steps", save_steps=2, perturb_lr=0.05)
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**kwargs))
    trainer.train()
    checkpoint = os.path.join(train_args["output_dir"], "checkpoint-2")
    assert os.path.exists(os.path.join(checkpoint, SIDE_FILE))
    _assert_weights_file_has_no_sigma(checkpoint)
    trained_sigma = trainer.perturbation.sigma.clone()
    # a new run resumed from the checkpoint starts from the checkpoint's sigma (not perturb_sigma_init)
    resumed = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**dict(kwargs, max_steps=2)))
    assert not torch.allclose(resumed.perturbation.sigma, trained_sigma)
    resumed.train(resume_from_checkpoint=checkpoint)
    torch.testing.assert_close(resumed.perturbation.sigma, trained_sigma)


def _oracle_loss(current, old, rollout, mask, adv, case, loss_type):
    """The baseline losses written out by hand (no alp_trl function): PPO ratio current / old clipped at 0.2 with dual
    clip 10, times the auxiliary weight old / rollout of each rule, over the loss mask it leaves."""
    ratio = torch.exp(current - old) if case["correction"] != "bypass" else torch.exp(current - rollout)
    per_token = torch.maximum(-ratio * adv, -ratio.clamp(0.8, 1.2) * adv)
    per_token = torch.where(adv < 0, torch.minimum(per_token, -10.0 * adv), per_token)
    log_w = (old - rollout) * mask
    correction, low, high = case["correction"], case.get("low"), case.get("high")
    if correction in ("seq_mis", "seq_tis"):
        log_w_seq = (
            log_w.sum(-1, keepdim=True)
            if case.get("aggregation", "sum") == "sum"
            else (log_w.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))
        )
        w = torch.exp(log_w_seq).expand_as(mask)
    else:
        w = torch.exp(log_w)
    keep = torch.ones_like(mask)
    if correction in ("token_mis", "seq_mis"):
        keep = ((w >= low) & (w <= (high if high is not None else float("inf")))).to(mask.dtype)
    elif correction in ("tis", "seq_tis"):
        w = w.clamp(max=high)
    if case.get("veto") is not None:
        vetoed = ((torch.exp(log_w) < case["veto"]) & mask.bool()).any(-1, keepdim=True)
        keep = keep * (~vetoed).to(mask.dtype)
    if correction in ("ppo", "bypass"):
        w = torch.ones_like(mask)
    weighted = per_token * w * keep * mask
    loss_mask = mask * keep if case.get("rejection", "drop") == "drop" else mask
    if loss_type == "bnpo":
        return weighted.sum() / loss_mask.sum(), keep
    return (weighted.sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean(), keep  # grpo


BASELINE_CASES = {
    "ppo": {"correction": "ppo"},
    "bypass": {"correction": "bypass"},
    "token_mis_drop": {"correction": "token_mis", "low": 0.9, "high": 1.1},
    "token_mis_zero": {"correction": "token_mis", "low": 0.9, "high": 1.1, "rejection": "zero"},
    "token_mis_one_sided": {"correction": "token_mis", "low": 0.9, "high": None},
    "seq_mis_product": {"correction": "seq_mis", "low": 0.7, "high": 1.1},
    "seq_mis_geometric": {"correction": "seq_mis", "low": 0.9, "high": 1.1, "aggregation": "mean"},
    "tis": {"correction": "tis", "high": 1.1},
    "seq_tis": {"correction": "seq_tis", "high": 1.1},
    "tis_veto": {"correction": "tis", "high": 1.1, "veto": 0.8},
}


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo"])
@pytest.mark.parametrize("name", list(BASELINE_CASES))
def test_baseline_losses_against_hand_written_formulas(
    make_model, tokenizer, prompt_dataset, train_args, name, loss_type
):
    """Every baseline's loss, written out by hand in this test, where its rejection / truncation / veto fires on some
    tokens or sequences and not on others; with `mis_rejection="drop"` the rejected leave the denominator, with
    `"zero"` they stay in it."""
    case = BASELINE_CASES[name]
    fields = {
        "mis_threshold_low": case.get("low"),
        "mis_threshold_high": case.get("high"),
        "mis_rejection": case.get("rejection", "drop"),
        "mis_aggregation": case.get("aggregation", "sum"),
        "mis_veto_threshold": case.get("veto"),
    }
    if case["correction"] in ("ppo", "bypass"):
        fields = {}
    trainer = build_trainer(
        make_model(),
        tokenizer,
        prompt_dataset,
        ALPConfig(**train_args, off_policy_correction=case["correction"], loss_type=loss_type, **fields),
    )
    inputs = _fixed_inputs(tokenizer)
    current = _current_logps(trainer, inputs)
    steps = torch.arange(current.numel(), dtype=current.dtype).view_as(current)
    old = current + 0.05 * torch.cos(steps)
    rollout = current + 0.25 * torch.sin(steps)
    loss, _ = _loss_and_grads(trainer, {**inputs, "old_per_token_logps": old, "sampling_per_token_logps": rollout})
    mask, adv = inputs["completion_mask"].to(current.dtype), inputs["advantages"].unsqueeze(1)
    expected, keep = _oracle_loss(current, old, rollout, mask, adv, case, loss_type)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    if case["correction"] in ("token_mis", "seq_mis") or "veto" in case:
        kept = (keep * mask).sum() / mask.sum()
        assert 0 < kept < 1, "the rule fires on some tokens and not on others"


@pytest.mark.parametrize("correction, old_logps_used", [("alp", False), ("bypass", False), ("token_mis", True)])
def test_old_policy_logps_are_computed_only_where_they_are_used(
    make_model, tokenizer, prompt_dataset, train_args, correction, old_logps_used
):
    """Generation every 2 optimizer steps (misaligned): TRL computes old-policy log-probs (one more forward pass over
    the generation batch); ALP and Bypass never read them, so they are skipped there, and only there."""
    args = ALPConfig(
        **{**train_args, "steps_per_generation": 2, "max_steps": 2},
        off_policy_correction=correction,
        perturb_sigma_init=0.05,
    )
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    generated, forwards = [], []
    generate, forward = trainer._generate_and_score_completions, trainer._get_per_token_logps_and_entropies

    def spy_generate(inputs):
        generated.append(generate(inputs))
        return generated[-1]

    def spy_forward(*call_args, **call_kwargs):
        forwards.append(torch.is_grad_enabled())
        return forward(*call_args, **call_kwargs)

    trainer._generate_and_score_completions, trainer._get_per_token_logps_and_entropies = spy_generate, spy_forward
    before = named_params(trainer.model)
    trainer.train()
    assert len(generated) == 1, "one generation batch for the 2 steps"
    assert ("old_per_token_logps" in generated[0]) == old_logps_used
    assert forwards.count(False) == int(old_logps_used), "no-grad forward passes: the old policy's, if used"
    assert forwards.count(True) == 2, "one training forward per step"
    assert trainer.args is args and args.gradient_accumulation_steps == 1
    after = named_params(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before if "lora" not in name)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    ("loss_type", "extra"),
    [
        ("dapo", {"entropy_coef": 0.01}),
        ("grpo", {"top_entropy_quantile": 0.5}),
        ("grpo", {"top_entropy_quantile": 0.5, "entropy_coef": 0.02}),
        ("dapo", {"use_adaptive_entropy": True, "entropy_coef": 0.05, "entropy_target": 100.0}),
        ("dapo", {"off_policy_mask_threshold": 0.05}),
        ("cispo", {"epsilon_high": 1.2}),
        ("sapo", {}),
        ("vespo", {}),
    ],
    ids=["entropy_coef", "top_entropy", "top_entropy+coef", "adaptive_entropy", "opsm", "cispo", "sapo", "vespo"],
)
def test_zero_sigma_alp_equals_grpo_with_trl_extras(
    saved_model_dir, tokenizer, prompt_dataset, train_args, level, loss_type, extra
):
    """The TRL features that were refused with a correction (entropy bonus, adaptive entropy, entropy masking, OPSM,
    the CISPO / SAPO / VESPO losses) through ALP's ratio: with sigma = 0 and the rollout denominator equal to TRL's old
    policy, loss, gradients and TRL's metrics equal `GRPOTrainer`'s. Two calls, so that the adaptive entropy controller
    applies the coefficient it set in the first."""
    common = dict(train_args, importance_sampling_level=level, loss_type=loss_type, **extra)
    grpo, alp = _grpo_and_noise_free_alp(saved_model_dir, tokenizer, prompt_dataset, common)
    inputs = _fixed_inputs(tokenizer)
    current = _current_logps(grpo, inputs)
    denominator = current + _shifted(current, 0.3)
    for _ in range(2):
        grpo_loss, grpo_grads = _loss_and_grads(grpo, {**inputs, "old_per_token_logps": denominator})
        alp_loss, alp_grads = _loss_and_grads(alp, {**inputs, "sampling_per_token_logps": denominator})
        torch.testing.assert_close(alp_loss, grpo_loss, atol=1e-6, rtol=0)
        for name, grad in grpo_grads.items():
            torch.testing.assert_close(alp_grads[name], grad, atol=1e-6, rtol=0, msg=name)
    for key in ("entropy_coef", "policy_loss", "cispo_clip_ratio", "vespo/phi_seq_mean"):
        if key in grpo._metrics["train"]:
            assert alp._metrics["train"][key] == pytest.approx(grpo._metrics["train"][key]), key
    if "entropy_coef" in extra:
        assert grpo._metrics["train"]["entropy_coef"], "the entropy bonus was applied"
    if loss_type == "cispo":
        assert 0 < grpo._metrics["train"]["cispo_clip_ratio"][-1] < 1, "truncation exercised"


def test_noise_survival_is_logged_per_layer(make_model, tokenizer, prompt_dataset, train_args):
    """fp32 hidden states keep the whole noise: survival ~1 on every layer (a float32 run), logged per layer and
    averaged; only ALP logs it."""
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args, perturb_sigma_init=0.05))
    trainer.train()
    logged = trainer.state.log_history[0]
    layers = [logged[f"alp/noise_survival/layer_{i:02d}"] for i in range(3)]
    assert all(v == pytest.approx(1.0, abs=0.1) for v in layers)
    assert logged["alp/noise_survival"] == pytest.approx(sum(layers) / 3)
    bypass = build_trainer(
        make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args, off_policy_correction="bypass")
    )
    bypass.train()
    assert "alp/noise_survival" not in bypass.state.log_history[0]


def test_unperturbed_ratio_is_logged_beside_the_perturbed_one(make_model, tokenizer, prompt_dataset, train_args):
    """`log_unperturbed_ratio`: on the first step (fp32 transformers generation, no engine mismatch) the unperturbed
    policy IS the rollout policy, so its ratio is 1 and its KL ~0, while ALP's perturbed ratio is off by its noise."""
    config = ALPConfig(**{**train_args, "max_steps": 1}, perturb_sigma_init=0.5, log_unperturbed_ratio=True)
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, config)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["alp/unperturbed_train_rollout_kl"] < 1e-8
    assert logged["alp/unperturbed_ratio/p50"] == pytest.approx(1.0, abs=1e-4)
    assert logged["alp/unperturbed_log_ratio_abs_max"] < 1e-4
    assert logged["alp/train_rollout_kl"] > 1e-4  # the perturbed ratio ALP optimises
    plain = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**{**train_args, "max_steps": 1}))
    plain.train()
    assert "alp/unperturbed_train_rollout_kl" not in plain.state.log_history[0]  # opt-in


def test_mis_logs_the_ratio_over_the_tokens_its_rejection_dropped(make_model, tokenizer, prompt_dataset, train_args):
    """Seq-MIS with `mis_rejection="drop"`: the update's ratio statistics see only the sequences it kept, so a
    rejection of every sequence logs a train-rollout KL of 0 while the policy is far from the engine (logit noise).
    `alp/all_tokens_*` is the ratio over every scored token: on the first step (no update yet) it equals the engine's
    measured distance from the policy over the whole generation batch (`rollout_mismatch/*`), and a run that keeps
    every sequence logs the same as its ordinary statistics."""
    base = {**train_args, "max_steps": 1, "off_policy_correction": "seq_mis"}
    base.update(rollout_mismatch="logit_noise", rollout_mismatch_std=1.0)
    kept, rejected = (
        build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**base, mis_threshold=c))
        for c in (1e30, 1.0 + 1e-6)
    )
    kept.train()
    rejected.train()
    everything, nothing = kept.state.log_history[0], rejected.state.log_history[0]
    assert everything["alp/mis_masked_frac"] == 0.0 and nothing["alp/mis_masked_frac"] == 1.0
    assert nothing["alp/train_rollout_kl"] == 0.0 and everything["alp/train_rollout_kl"] > 0.05
    for logged in (everything, nothing):
        assert logged["alp/all_tokens_train_rollout_kl"] == pytest.approx(logged["rollout_mismatch/kl_k3"], rel=1e-4)
        assert logged["alp/all_tokens_log_ratio_abs_max"] == pytest.approx(
            logged["rollout_mismatch/logp_abs_diff_max"], rel=1e-4
        )
    for key in ("train_rollout_kl", "log_ratio_abs_max", "ratio/p99"):
        assert everything[f"alp/all_tokens_{key}"] == pytest.approx(everything[f"alp/{key}"], rel=1e-5), key
    bypass = build_trainer(
        make_model(), tokenizer, prompt_dataset, ALPConfig(**{**base, "off_policy_correction": "bypass"})
    )
    bypass.train()
    assert "alp/all_tokens_train_rollout_kl" not in bypass.state.log_history[0]  # nothing is dropped: not logged


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("shape", ["scalar", "channel"])
def test_sigma_gradient_matches_a_central_finite_difference(
    make_model, tokenizer, prompt_dataset, train_args, level, shape
):
    """The noise is a deterministic function of its key, so the loss is a smooth function of log_sigma: its
    backward gradient must equal (L(log_sigma + h) - L(log_sigma - h)) / 2h, in value and sign."""
    trainer = build_trainer(
        make_model(),
        tokenizer,
        prompt_dataset,
        ALPConfig(
            **train_args,
            perturb_sigma_init=0.2,
            perturb_sigma_shape=shape,
            importance_sampling_level=level,
            loss_type="bnpo",
        ),
    )
    inputs = _fixed_inputs(tokenizer)
    current = _current_logps(trainer, inputs)
    inputs["sampling_per_token_logps"] = current + 0.05 * _shifted(current, 1.0)
    _, grads = _loss_and_grads(trainer, inputs)
    analytic = grads[f"{MODULE_NAME}.log_sigma"]
    log_sigma = trainer.perturbation.log_sigma
    h = 0.05  # the loss is float32: a larger step keeps the difference far above its rounding (curvature error ~h^2)
    slots = [(0,), (2,)] if shape == "scalar" else [(0, 0), (1, 5), (2, 31)]
    for slot in slots:
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                log_sigma[slot] += sign * h
            values.append(_loss_and_grads(trainer, inputs)[0].item())
            with torch.no_grad():
                log_sigma[slot] -= sign * h
        numeric = (values[0] - values[1]) / (2 * h)
        assert abs(numeric) > 1e-6, "the probe point has a gradient worth checking"
        assert analytic[slot].item() == pytest.approx(numeric, rel=2e-2, abs=1e-6), slot


KNOB_CASES = {
    # name: (ALPConfig fields, shift of the rollout denominator applied to current log-probs)
    "dual_clip": ({"dual_clip_c": 1.5}, "down"),
    "log_ratio_clamp": ({"log_ratio_clamp": 0.5}, "wide"),
    "sequence_sum": ({"importance_sampling_level": "sequence", "sequence_ratio_aggregation": "sum"}, "small"),
    "delta": ({"delta": 1.1, "dual_clip_c": None}, "down"),
    "bias_corrected_kl": ({"beta": 0.1, "use_bias_correction_kl": True}, "small"),
}


@pytest.mark.parametrize("name", list(KNOB_CASES))
def test_each_objective_knob_fires_with_the_hand_computed_loss(
    saved_model_dir, tokenizer, prompt_dataset, train_args, name
):
    """Dual clip, the log-ratio clamp, summed sequence ratios, delta and the bias-corrected KL, each where it fires, the
    loss written out by hand (ALP with sigma 0: the ratio is policy / rollout)."""
    fields, shift_kind = KNOB_CASES[name]
    fields = {"dual_clip_c": 10.0, **fields}
    trainer = build_trainer(
        saved_model_dir,
        tokenizer,
        prompt_dataset,
        ALPConfig(**train_args, perturb_sigma_init=0.0, perturb_sigma_learnable=False, loss_type="bnpo", **fields),
    )
    inputs = _fixed_inputs(tokenizer)
    current = _current_logps(trainer, inputs)
    mask = inputs["completion_mask"].to(current.dtype)
    adv = inputs["advantages"].unsqueeze(1)
    steps = torch.arange(current.numel(), dtype=current.dtype).view_as(current)
    shift = {
        "down": torch.full_like(current, -1.0),
        "wide": 0.8 * torch.sign(torch.sin(steps)),
        "small": 0.1 * torch.sin(steps),
    }[shift_kind]
    rollout = current + shift
    if name == "bias_corrected_kl":
        inputs["ref_per_token_logps"] = current - 0.3
    loss, _ = _loss_and_grads(trainer, {**inputs, "sampling_per_token_logps": rollout})

    log_r = current - rollout
    if name == "log_ratio_clamp":
        log_r = log_r.clamp(-0.5, 0.5)
    if name == "sequence_sum":
        log_r = (log_r * mask).sum(-1, keepdim=True).expand_as(log_r)
    r = torch.exp(log_r)
    unclipped = r.clamp(max=1.1) if name == "delta" else r
    per_token = torch.maximum(-unclipped * adv, -r.clamp(0.8, 1.2) * adv)
    if fields["dual_clip_c"] is not None:
        cap = -fields["dual_clip_c"] * adv
        fired = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    if name == "bias_corrected_kl":
        d = inputs["ref_per_token_logps"] - current
        per_token = per_token + 0.1 * (torch.exp(d) - d - 1) * torch.exp(current - rollout)
    expected = (per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    if name == "dual_clip":
        fraction = (fired.expand_as(mask) * mask).sum() / mask.sum()
        assert fraction > 0
        assert trainer._metrics["train"]["alp/dual_clip_frac"][-1] == pytest.approx(fraction.item())
    if name == "log_ratio_clamp":
        assert (current - rollout).abs().max() > 0.5, "the clamp fired"
        assert trainer._metrics["train"]["alp/log_ratio_abs_max_preclamp"][-1] == pytest.approx(0.8, abs=1e-5)


def test_gradient_accumulation_keys_the_noise_by_micro_step(make_model, tokenizer, prompt_dataset, train_args):
    """With 2 micro-steps per optimizer step, every micro-step draws its own noise, keyed by (optimizer step,
    micro-step in the window): the keys of 2 steps are (0, 0), (0, 1), (1, 0), (1, 1), with different noise each."""
    trainer = build_trainer(
        make_model(),
        tokenizer,
        prompt_dataset,
        ALPConfig(**train_args, perturb_sigma_init=0.1, gradient_accumulation_steps=2),
    )
    seen = {}

    def record(module, args, output):
        key = module._current_key()
        if key is not None and key not in seen:
            seen[key] = (output - args[0]).detach().flatten()[:32].clone()

    handle = trainer.perturbation.register_forward_hook(record)
    trainer.train()
    handle.remove()
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    noises = list(seen.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(noises) for b in noises[i + 1 :])
