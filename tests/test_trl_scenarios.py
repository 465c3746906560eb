"""Every GRPOTrainer configuration of TRL 1.16 (the map of TRL's own GRPO tests), run with `off_policy_correction`
`"none"` (plain GRPO) and `"alp"` on a tiny model: it trains, and exactly the parameters that should change do
(the transformer weights, or only the adapter; sigma with ALP)."""

import asyncio
import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig, TaskType

from alp_trl import ALPConfig
from alp_trl.tiny_models import build_tiny_causal_lm

from .helpers import build_trainer, diversity_reward


def length_reward(completions, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 7) for t in texts]


def sometimes_none_reward(completions, **kwargs):
    """A reward that abstains (None) on every other sample, as TRL allows."""
    return [None if i % 2 else 1.0 + i for i in range(len(completions))]


async def async_reward(completions, **kwargs):
    await asyncio.sleep(0)
    return [float(i % 3) for i in range(len(completions))]


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

# name: (config fields, trainer keyword arguments, model builder name, what must change)
SCENARIOS = {
    **{f"loss_{lt}": ({"loss_type": lt}, {}, "dense", "full") for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")},
    "loss_cispo": ({"loss_type": "cispo", "epsilon_high": 5.0}, {}, "dense", "full"),
    "loss_sapo": ({"loss_type": "sapo"}, {}, "dense", "full"),
    "loss_vespo": ({"loss_type": "vespo"}, {}, "dense", "full"),
    "sequence_level": ({"importance_sampling_level": "sequence"}, {}, "dense", "full"),
    "beta_ref_model": ({"beta": 0.04}, {}, "by_name", "full"),
    "beta_peft_no_ref_model": ({"beta": 0.04}, {"peft_config": LORA}, "dense", "lora"),
    "sync_ref_model": ({"beta": 0.04, "sync_ref_model": True, "ref_model_sync_steps": 1}, {}, "by_name", "full"),
    "peft_lora": ({}, {"peft_config": LORA}, "dense", "lora"),
    "peft_moe": (
        {},
        {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")},
        "moe",
        "lora",
    ),
    "peft_prompt_tuning": (
        {},
        {"peft_config": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)},
        "dense",
        "prompt",
    ),
    "num_iterations_2": ({"num_iterations": 2}, {}, "dense", "full"),
    "steps_per_generation_4": ({"steps_per_generation": 4, "max_steps": 4}, {}, "dense", "full"),
    "gradient_accumulation_2": ({"gradient_accumulation_steps": 2}, {}, "dense", "full"),
    "mask_truncated_completions": (
        {"mask_truncated_completions": True, "max_completion_length": 24},
        {},
        "dense",
        "full",
    ),
    **{f"scale_rewards_{v}": ({"scale_rewards": v}, {}, "dense", "full") for v in ("group", "batch", "none")},
    "multi_reward_weights_and_none": (
        {"reward_weights": [0.7, 0.3]},
        {"reward_funcs": [length_reward, sometimes_none_reward]},
        "dense",
        "full",
    ),
    "async_reward": ({}, {"reward_funcs": [async_reward, length_reward]}, "dense", "full"),
    "generation_kwargs": ({"generation_kwargs": {"suppress_tokens": [5, 6]}}, {}, "dense", "full"),
    "gradient_checkpointing": ({"gradient_checkpointing": True}, {}, "dense", "full"),
    "eval_num_generations_eval": (
        {"eval_strategy": "steps", "eval_steps": 1, "num_generations_eval": 2, "per_device_eval_batch_size": 4},
        {"eval_dataset": "same"},
        "dense",
        "full",
    ),
}


def _model(kind, make_model, saved_model_dir, tokenizer):
    if kind == "by_name":
        return saved_model_dir  # TRL then loads a reference model by the same name
    if kind == "moe":
        return build_tiny_causal_lm("qwen3_moe", vocab_size=len(tokenizer), num_layers=2)  # 4 experts, 2 per token
    return make_model()


@pytest.mark.parametrize("correction", ["none", "alp"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_trl_scenario_trains_the_right_parameters(
    make_model, saved_model_dir, tokenizer, prompt_dataset, train_args, scenario, correction
):
    fields, trainer_kwargs, kind, expect = SCENARIOS[scenario]
    trainer_kwargs = dict(trainer_kwargs)
    if trainer_kwargs.get("eval_dataset") == "same":
        trainer_kwargs["eval_dataset"] = Dataset.from_dict(prompt_dataset[:4])
    reward_funcs = trainer_kwargs.pop("reward_funcs", diversity_reward)
    peft_config = trainer_kwargs.get("peft_config")
    if peft_config is not None:
        trainer_kwargs["peft_config"] = copy.deepcopy(peft_config)
    args = ALPConfig(
        **{**train_args, "learning_rate": 1e-2, **fields},
        off_policy_correction=correction,
        perturb_sigma_init=0.05,
        perturb_lr=0.1,
    )
    trainer = build_trainer(
        _model(kind, make_model, saved_model_dir, tokenizer),
        tokenizer,
        prompt_dataset,
        args,
        reward_funcs=reward_funcs,
        **trainer_kwargs,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in after.items() if p.requires_grad}
    sigma = {n for n in after if "alp_perturbation" in n}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert bool(sigma) == (correction == "alp") and sigma <= changed, "sigma exists and trains with ALP only"
    weights = changed - sigma
    if expect == "full":
        assert any(".layers.0." in n for n in weights) and any(".layers.1." in n for n in weights), sorted(weights)[:5]
    elif expect == "lora":
        assert weights and all("lora_" in n for n in weights), sorted(weights)[:5]
    elif expect == "prompt":
        assert weights and all("prompt_encoder" in n for n in weights), sorted(weights)[:5]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(loss == loss for loss in losses), "finite losses"
    if "eval_strategy" in fields:
        assert any("eval_loss" in r for r in trainer.state.log_history)
