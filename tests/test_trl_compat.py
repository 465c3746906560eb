"""The private TRL / transformers surface ALPGRPOTrainer overrides or calls, checked against the installed versions: a
TRL upgrade that changes one of them fails here, naming the method and what changed, instead of misbehaving."""

import inspect

import pytest
from transformers import Trainer
from trl import GRPOTrainer
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration

from alp_trl.trainer import _FORWARD_KWARG_KEYS, ALPGRPOTrainer


# method: the leading parameters (after self) the trainer relies on, in order
SIGNATURES = {
    (GRPOTrainer, "_generate"): ["prompts"],
    (GRPOTrainer, "_generate_single_turn"): [
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ],
    (GRPOTrainer, "_generate_and_score_completions"): ["inputs"],
    (GRPOTrainer, "_compute_loss"): ["model", "inputs"],
    (GRPOTrainer, "_get_per_token_logps_and_entropies"): [
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
    ],
    (GRPOTrainer, "_tokenize_prompts"): ["prompts"],
    (GRPOTrainer, "_prepare_inputs"): ["generation_batch"],
    (GRPOTrainer, "get_high_entropy_mask"): ["entropies", "mask", "threshold"],
    (GRPOTrainer, "training_step"): ["model", "inputs", "num_items_in_batch"],
    (GRPOTrainer, "log"): ["logs", "start_time"],
    (Trainer, "_save"): ["output_dir", "state_dict"],
    (Trainer, "_load_from_checkpoint"): ["resume_from_checkpoint", "model"],
    (Trainer, "_get_grad_norm"): ["model", "grad_norm"],
    # alp_trl/vllm_weight_transfer.py: the file channel subclasses TRL's client (importable without vLLM)
    (VLLMClient, "_post"): ["url"],
    (VLLMClient, "_start_weight_update"): [],
    (VLLMClient, "_finish_weight_update"): [],
    (VLLMClient, "update_named_params"): ["metadata", "named_params"],
    (VLLMClient, "init_communicator"): ["device"],
    (VLLMClient, "close_communicator"): [],
}


@pytest.mark.parametrize(("owner", "name"), list(SIGNATURES), ids=lambda x: getattr(x, "__name__", x))
def test_private_method_signatures(owner, name):
    method = getattr(owner, name, None)
    assert method is not None, f"{owner.__name__}.{name} no longer exists: alp_trl/trainer.py overrides or calls it"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    expected = SIGNATURES[(owner, name)]
    assert params[: len(expected)] == expected, (
        f"{owner.__name__}.{name} now takes {params}, alp_trl expects {expected} first: update alp_trl/trainer.py"
    )


@pytest.mark.parametrize(
    ("owner", "name", "fragment", "why"),
    [
        (
            GRPOTrainer,
            "_generate",
            "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images",
            "ALPGRPOTrainer._generate unpacks this 8-tuple to check the rollout log-probs",
        ),
        (
            GRPOTrainer,
            "_generate",
            "output = self.rollout_func(prompts, self)",
            "code_tool='python' and the rollout_func tests rely on this call",
        ),
        (
            GRPOTrainer,
            "_generate_and_score_completions",
            'output["sampling_per_token_logps"] = sampling_per_token_logps',
            "the rollout denominator is read from this key",
        ),
        (
            GRPOTrainer,
            "_generate_and_score_completions",
            "self.args.gradient_accumulation_steps % generate_every != 0",
            "the old-policy forward is skipped for ALP / Bypass by presenting aligned args (_skipping_unused_old_logps)",
        ),
        (
            GRPOTrainer,
            "__init__",
            "self.add_callback(SyncRefModelCallback(",
            "the reference sync callback is replaced by one without sigma",
        ),
        (
            GRPOTrainer,
            "__init__",
            "self._entropy_bonus_enabled",
            "the entropy bonus reuses TRL's controller state",
        ),
        (
            GRPOTrainer,
            "__init__",
            "self.model.add_model_tags(self._tag_names)",
            "ALPGRPOTrainer._tag_names adds the 'alp' tag to the model and its card",
        ),
        (
            VLLMClient,
            "weight_update",
            "self._updating_weights = True",
            "FileWeightSyncClient.update_named_params reads this flag to open and close a weight update only once",
        ),
        (
            VLLMGeneration,
            "sync_weights",
            "self._llm_weights_sleeping",
            "alp_trl.vllm_engine's _init_vllm override sets this flag, which TRL reads before a sync",
        ),
    ],
)
def test_private_behaviour_the_trainer_relies_on(owner, name, fragment, why):
    source = inspect.getsource(getattr(owner, name))
    assert fragment in source, f"{owner.__name__}.{name} no longer contains `{fragment}`: {why}."


def test_metric_and_step_state_exist(make_model, tokenizer, prompt_dataset, train_args):
    from alp_trl import ALPConfig

    from .helpers import build_trainer

    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args))
    assert isinstance(trainer._metrics["train"], dict) and trainer._step == 0
    for attribute in ("entropy_coef", "_last_world_entropy", "_entropy_window_stats", "_tokenizer", "eos_token_ids"):
        assert hasattr(trainer, attribute), f"GRPOTrainer no longer sets `{attribute}`"


def test_vllm_backend_construction_matches_trls():
    """`alp_trl.vllm_engine` builds TRL's `VLLMGeneration` itself (engine options, CPU weight sync): the arguments it
    passes must be exactly those `VLLMGeneration` takes, the colocated `LLM` arguments it repeats must still be TRL's,
    and `GRPOTrainer.__init__` must still build its backend only under `use_vllm`, in the attributes the trainer sets."""
    import ast

    from trl.generation.vllm_generation import VLLMGeneration

    from alp_trl import vllm_engine

    taken = {p for p in inspect.signature(VLLMGeneration.__init__).parameters if p != "self"}
    call = next(
        node
        for node in ast.walk(ast.parse(inspect.getsource(vllm_engine.build_vllm_generation)))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "EngineOptionsVLLMGeneration"
    )
    passed = {keyword.arg for keyword in call.keywords} - {"engine_options", "weight_sync_dir"}
    assert passed == taken, f"VLLMGeneration now takes {sorted(taken)}; build_vllm_generation passes {sorted(passed)}"
    colocate = inspect.getsource(VLLMGeneration._init_vllm)
    for key, value in vllm_engine.TRL_COLOCATE_LLM_ARGS.items():
        assert f"{key}={value!r}".replace("'", '"') in colocate, f"TRL no longer passes {key}={value!r} to LLM"
    init = inspect.getsource(GRPOTrainer.__init__)
    assert "self.use_vllm = args.use_vllm" in init and "self.vllm_generation = VLLMGeneration(" in init
    assert "self._last_loaded_step = -1" in init
    for method in ("_iter_named_params", "sync_weights", "generate"):
        assert hasattr(VLLMGeneration, method), f"VLLMGeneration.{method} is gone: alp_trl/vllm_engine.py uses it"


def test_forward_inputs_the_trainer_passes_are_all_trls():
    """`_compute_loss` forwards `compute_aux_loss` and every key of `_FORWARD_KWARG_KEYS` to
    `_get_per_token_logps_and_entropies`: a model input TRL adds (a new multimodal field) must be added there too, or
    the perturbed forward would silently run without it."""
    params = [p for p in inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters if p != "self"]
    assert set(params[6:]) == {"compute_aux_loss", *_FORWARD_KWARG_KEYS}, (
        f"TRL's forward inputs are now {params[6:]}: update alp_trl/trainer.py's _FORWARD_KWARG_KEYS"
    )


def test_colocated_engine_override_signature_and_trainer_names():
    assert [p for p in inspect.signature(VLLMGeneration._init_vllm).parameters if p != "self"] == [], (
        "VLLMGeneration._init_vllm now takes arguments: update alp_trl/vllm_engine.py's override"
    )
    # TRL's model card reads these two class attributes (tests/test_hub.py checks the card shows them)
    assert "_tag_names" in vars(GRPOTrainer) and isinstance(getattr(GRPOTrainer, "_name", None), str)
    assert ALPGRPOTrainer._tag_names == [*GRPOTrainer._tag_names, "alp"]
