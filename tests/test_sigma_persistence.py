"""sigma outside the model weights (`alp_trl.sigma_persistence`): the model card's section by value, and TRL's
reference-model sync replaced by one that leaves sigma out."""

import copy
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.callbacks import SyncRefModelCallback

from alp_trl.perturbation import LayerwisePerturbation
from alp_trl.sigma_persistence import SyncRefModelWithoutSigma, model_card_section
from alp_trl.tiny_models import build_tiny_causal_lm

from .helpers import tiny_config


def test_model_card_section_of_alp_with_sigma_and_the_recipe(tmp_path):
    card = model_card_section(tiny_config(tmp_path), {0: 0.02, 2: 0.123456}, "a: 1\nb: two\n\n")
    assert card.splitlines() == [
        "",
        "## ALP settings",
        "",
        "- off_policy_correction: `alp`",
        "- importance_sampling_level: `token` (sequence aggregation `mean`)",
        "- clip: epsilon `0.2`, epsilon_high `0.2`, dual_clip_c `10.0`",  # unset: epsilon, as the loss reads it
        "- perturb_layers: `all`, sigma shape `scalar`, noise scale `absolute`",
        "- sigma per layer: 0: 0.02, 2: 0.1235",
        "- sigma is stored in `alp_perturbation.safetensors` beside the weights and is not part of them.",
        "",
        "## Recipe",
        "",
        "```yaml",
        "a: 1",
        "b: two",
        "```",
    ]
    assert card.endswith("```\n")


def test_model_card_section_of_bypass_without_sigma(tmp_path):
    config = tiny_config(tmp_path, off_policy_correction="bypass", epsilon=0.1, epsilon_high=0.3, dual_clip_c=3.0)
    assert model_card_section(config, None, None) == (
        "\n## ALP settings\n\n"
        "- off_policy_correction: `bypass`\n"
        "- importance_sampling_level: `token` (sequence aggregation `mean`)\n"
        "- clip: epsilon `0.1`, epsilon_high `0.3`, dual_clip_c `3.0`\n"
    )


class _SubclassedSync(SyncRefModelCallback):
    """Someone else's reference sync: not TRL's own class, so not replaced."""


def test_replace_in_swaps_exactly_trls_reference_sync():
    ref_model, accelerator, perturbation = object(), object(), object()
    other, trls, subclassed = object(), SyncRefModelCallback(ref_model, accelerator), _SubclassedSync(None, None)
    callbacks = [other, trls, subclassed]
    SyncRefModelWithoutSigma.replace_in(callbacks, perturbation)
    assert len(callbacks) == 3 and callbacks[0] is other and callbacks[2] is subclassed
    replaced = callbacks[1]
    assert type(replaced) is SyncRefModelWithoutSigma
    assert (replaced.ref_model, replaced.accelerator, replaced.perturbation) == (ref_model, accelerator, perturbation)
    again = list(callbacks)
    SyncRefModelWithoutSigma.replace_in(again, perturbation)
    assert again == callbacks, "nothing left to replace"


def test_the_replaced_sync_copies_the_weights_without_sigma():
    policy = build_tiny_causal_lm("qwen2", vocab_size=64, num_layers=2, hidden_size=16)
    ref_model = build_tiny_causal_lm("qwen2", vocab_size=64, num_layers=2, hidden_size=16, seed=1)
    perturbation = LayerwisePerturbation.attach(policy, "all", sigma_init=0.1)
    weights = {n: p for n, p in policy.named_parameters() if "alp_perturbation" not in n}
    assert not all(torch.equal(p, weights[n]) for n, p in ref_model.named_parameters()), "other weights to start"
    args = SimpleNamespace(ref_model_sync_steps=1, ref_model_mixup_alpha=1.0)
    state = SimpleNamespace(global_step=1)
    with pytest.raises(ValueError):  # TRL's own: the policy has one parameter more (sigma)
        SyncRefModelCallback(copy.deepcopy(ref_model), None).on_step_end(args, state, None, model=policy)
    SyncRefModelWithoutSigma(ref_model, None, perturbation).on_step_end(args, state, None, model=policy)
    assert all(torch.equal(p, weights[n]) for n, p in ref_model.named_parameters())
    assert policy.alp_perturbation is perturbation, "sigma is back in the policy"
