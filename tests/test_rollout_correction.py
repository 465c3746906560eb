"""The MIS / TIS baselines end to end: the weight and rejection computed once per generation batch, the loss's global
denominator without the rejected tokens, TRL's `vllm_importance_sampling_mode` as an independent oracle, the
importance-weight diagnostics by value, and the metrics-only mode of plain GRPO."""

import copy

import pytest
import torch

from alp_trl import ALPConfig

from .doubles import attach_fake_vllm
from .helpers import build_trainer


def _engine_batch(trainer, prompt_dataset, logit_noise=0.4):
    attach_fake_vllm(trainer, logit_noise=logit_noise)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer._generate_and_score_completions([prompt_dataset[i] for i in range(4)])


@pytest.mark.parametrize("rejection", ["drop", "zero"])
def test_rejected_tokens_leave_the_dapo_denominator_with_drop(
    make_model, tokenizer, prompt_dataset, train_args, rejection
):
    args = ALPConfig(
        **train_args,
        off_policy_correction="token_mis",
        mis_threshold_low=0.8,
        mis_threshold_high=1.25,
        mis_rejection=rejection,
        loss_type="dapo",
        dual_clip_c=None,
    )
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    output = _engine_batch(trainer, prompt_dataset)
    mask = output["completion_mask"].float()
    old, rollout = output["old_per_token_logps"], output["sampling_per_token_logps"]
    w = torch.exp(old - rollout)
    rejected = ((w < 0.8) | (w > 1.25)) & mask.bool()
    assert 0 < rejected.sum() < mask.sum(), "the engine's noise makes MIS reject some tokens, not all"
    expected_items = mask.sum() - rejected.sum() if rejection == "drop" else mask.sum()
    assert output["num_items_in_batch"].item() == expected_items.item()
    assert trainer._metrics["train"]["alp/mis_masked_frac"] == [pytest.approx((rejected.sum() / mask.sum()).item())]

    loss = trainer._compute_loss(trainer.model, output)
    current = _policy_logps(trainer, output)
    ratio = torch.exp(current - old)
    adv = output["advantages"].unsqueeze(1)
    per_token = torch.maximum(-ratio * adv, -ratio.clamp(0.8, 1.28) * adv) * w * (~rejected)
    torch.testing.assert_close(loss, (per_token * mask).sum() / expected_items, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("correction", "extra"),
    [
        ("tis", {"mis_threshold_high": 1.25}),
        ("seq_mis", {"mis_threshold_low": 0.2, "mis_threshold_high": 5.0}),
        ("token_mis", {"mis_threshold_low": 0.35, "mis_threshold_high": 2.0, "mis_veto_threshold": 0.45}),
    ],
)
def test_correction_fractions_are_logged_by_value(
    make_model, tokenizer, prompt_dataset, train_args, correction, extra
):
    """What the MIS / TIS weight did, counted by hand from the engine's log-probs: TIS's truncated tokens, Seq-MIS's
    rejected sequences (product of the token ratios outside the bounds), the veto's sequences and the tokens the
    bounds or the veto rejected."""
    args = ALPConfig(**train_args, off_policy_correction=correction, **extra)
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    output = _engine_batch(trainer, prompt_dataset)
    metrics = trainer._metrics["train"]
    mask = output["completion_mask"].bool()
    log_w = (output["old_per_token_logps"] - output["sampling_per_token_logps"]) * mask
    w = torch.exp(log_w)
    if correction == "tis":
        truncated = (w > 1.25) & mask
        assert 0 < truncated.sum() < mask.sum()
        assert metrics["alp/tis_truncated_frac"] == [pytest.approx((truncated.sum() / mask.sum()).item())]
        assert "alp/mis_masked_frac" not in metrics
    elif correction == "seq_mis":
        seq_w = torch.exp(log_w.sum(-1))
        rejected = ((seq_w < 0.2) | (seq_w > 5.0)) & mask.any(-1)
        assert 0 < rejected.sum() < mask.any(-1).sum()
        assert metrics["alp/mis_masked_frac"] == [pytest.approx((rejected.sum() / mask.any(-1).sum()).item())]
    else:
        vetoed = ((w < 0.45) & mask).any(-1)
        rejected = (((w < 0.35) | (w > 2.0)) | vetoed.unsqueeze(-1)) & mask
        assert 0 < vetoed.sum() < mask.any(-1).sum()
        assert metrics["alp/mis_veto_frac"] == [pytest.approx((vetoed.sum() / mask.any(-1).sum()).item())]
        assert metrics["alp/mis_masked_frac"] == [pytest.approx((rejected.sum() / mask.sum()).item())]


def _policy_logps(trainer, output):
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, output["completion_ids"].size(1)
        )[0]


@pytest.mark.parametrize(
    ("trl_mode", "correction"),
    [
        ("token_truncate", "tis"),
        ("token_mask", "token_mis"),
        ("sequence_mask", "seq_mis"),
        ("sequence_truncate", "seq_tis"),
    ],
)
def test_equal_to_trl_vllm_importance_sampling_where_the_definitions_coincide(
    make_model, tokenizer, prompt_dataset, train_args, trl_mode, correction
):
    """TRL's own vLLM importance-sampling correction (plain GRPO, `vllm_importance_sampling_mode`) and the matching
    baseline here (`mis_rejection="zero"`, TRL's convention; product sequence weight; no dual clip), on the same rollouts
    of the fake vLLM engine: the same loss and gradients."""
    low, high = (0.8, 1.25) if "token" in trl_mode else (0.5, 2.0)
    model = make_model()
    trl = build_trainer(
        copy.deepcopy(model),
        tokenizer,
        prompt_dataset,
        ALPConfig(
            **train_args,
            off_policy_correction="none",
            vllm_importance_sampling_correction=True,
            vllm_importance_sampling_mode=trl_mode,
            vllm_importance_sampling_clip_min=low,
            vllm_importance_sampling_clip_max=high,
        ),
    )
    trl.use_vllm = True  # TRL's own vLLM branch: old log-probs and the IS ratio
    output = _engine_batch(trl, prompt_dataset, logit_noise=0.4 if "token" in trl_mode else 0.1)
    assert "importance_sampling_ratio" in output
    ours = build_trainer(
        copy.deepcopy(model),
        tokenizer,
        prompt_dataset,
        ALPConfig(
            **train_args,
            off_policy_correction=correction,
            mis_threshold_low=low,
            mis_threshold_high=high,
            mis_rejection="zero",
            mis_aggregation="sum",
            dual_clip_c=None,
        ),
    )
    ours.model.train()
    ours.current_gradient_accumulation_steps = 1
    mask = output["completion_mask"]
    batch = {k: v for k, v in output.items() if k != "importance_sampling_ratio"}
    ours._rollout_denominator.attach_rollout_weight(
        batch,
        batch["old_per_token_logps"],
        batch["sampling_per_token_logps"],
        mask,
        ours.accelerator,
        ours._metrics["train"],
    )
    ratio = output["importance_sampling_ratio"]
    fired = (ratio == 0) | (ratio == low) | (ratio == high)
    assert fired.any() and not fired.all(), "the bounds fire on some weights"

    losses, grads = [], []
    for trainer, inputs in ((trl, output), (ours, batch)):
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)


def test_trainer_logs_the_weight_diagnostics_by_value(make_model, tokenizer, prompt_dataset, train_args):
    args = ALPConfig(**train_args, off_policy_correction="bypass")
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    output = _engine_batch(trainer, prompt_dataset)
    trainer._compute_loss(trainer.model, output)
    mask = output["completion_mask"].bool()
    lr = (_policy_logps(trainer, output) - output["sampling_per_token_logps"])[mask]
    w = lr.exp()
    metrics = trainer._metrics["train"]
    assert metrics["alp/is_weight_chi2"][-1] == pytest.approx((w.pow(2).mean() - 1).item(), rel=1e-5)
    assert metrics["alp/is_weight_ess_frac"][-1] == pytest.approx((w.sum() ** 2 / (w.numel() * w.pow(2).sum())).item())
    assert metrics["alp/log_ratio_abs_max_preclamp"][-1] == pytest.approx(lr.abs().max().item())
    assert metrics["alp/seq_clamped_frac"][-1] == 0.0


def test_metrics_only_mode_logs_the_mismatch_and_leaves_trl_loss_alone(
    make_model, tokenizer, prompt_dataset, train_args
):
    """`off_policy_correction="none"` with `log_rollout_mismatch=True`: the engine's distance from the clean policy
    is logged (equal to the hand-computed k3 KL), and the loss is TRL's, bit for bit, as without the switch."""
    model = make_model()
    trainers = [
        build_trainer(
            copy.deepcopy(model),
            tokenizer,
            prompt_dataset,
            ALPConfig(**train_args, off_policy_correction="none", log_rollout_mismatch=flag),
        )
        for flag in (True, False)
    ]
    outputs = []
    for trainer in trainers:
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        torch.manual_seed(0)
        outputs.append(trainer._generate_and_score_completions([prompt_dataset[i] for i in range(4)]))
    metered, plain = outputs
    assert "sampling_per_token_logps" not in metered, "TRL's loss never sees the recorded log-probs"
    kl = trainers[0]._metrics["train"]["rollout_mismatch/kl_k3"]
    assert kl and kl[0] == pytest.approx(0.0, abs=1e-5), "transformers generation in fp32: no mismatch"
    assert "rollout_mismatch/kl_k3" not in trainers[1]._metrics["train"]
    for key in ("completion_ids", "advantages"):
        assert torch.equal(metered[key], plain[key])
    losses = [t._compute_loss(t.model, o) for t, o in zip(trainers, outputs)]
    assert torch.equal(losses[0], losses[1])


def test_metrics_only_mode_measures_a_real_engine_mismatch(make_model, tokenizer, prompt_dataset, train_args):
    args = ALPConfig(**train_args, off_policy_correction="none", log_rollout_mismatch=True)
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    output = _engine_batch(trainer, prompt_dataset, logit_noise=0.5)
    mask = output["completion_mask"].bool()
    d = (_policy_logps(trainer, output) - output["sampling_per_token_logps"])[mask]
    metrics = trainer._metrics["train"]
    assert metrics["rollout_mismatch/kl_k3"][-1] == pytest.approx((d.exp() - 1 - d).mean().item(), rel=1e-4)
    assert metrics["rollout_mismatch/logp_abs_diff_max"][-1] == pytest.approx(d.abs().max().item(), rel=1e-5)
