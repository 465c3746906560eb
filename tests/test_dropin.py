"""ALPGRPOTrainer as a drop-in for GRPOTrainer: TRL features that crashed with ALP (reference-model sync, beam search,
generation paths the log-prob recorder cannot see, tools and environments, `rollout_func`) work or are refused on
purpose; the rollout log-probs never go out of line with the completions TRL assembles."""

import copy
import logging

import pytest
import torch
from datasets import Dataset
from trl.chat_template_utils import qwen2_5_chat_template

from alp_trl import ALPConfig

from .doubles import GenerateThenAlter, GenerateWithoutHookedForward, ScriptedGenerate
from .helpers import build_trainer, named_params


def _changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


# ------------------------------------------------------------------------------------------ reference-model sync
@pytest.mark.parametrize("correction", ["alp", "none"])
def test_sync_ref_model_mixes_the_weights_without_sigma(
    saved_model_dir, tokenizer, prompt_dataset, train_args, correction
):
    """TRL's sync callback zipped the policy's parameters (one more: sigma) with the reference model's and crashed at
    the first sync. Now: after each step, ref <- (1 - alpha) ref + alpha policy, parameter by parameter, sigma never
    involved, and the reference model stays without noise modules."""
    from transformers import TrainerCallback

    alpha = 0.5
    args = ALPConfig(
        **train_args,
        off_policy_correction=correction,
        beta=0.04,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=alpha,
        perturb_sigma_init=0.05,
    )
    trainer = build_trainer(saved_model_dir, tokenizer, prompt_dataset, args)  # by name: TRL loads the reference
    ref_before = named_params(trainer.ref_model)
    seen = []

    class Record(TrainerCallback):  # runs after the sync callback (added later)
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append((named_params(model), named_params(trainer.ref_model)))

    trainer.add_callback(Record())
    trainer.train()
    assert not any("alp_perturbation" in n for n, _ in trainer.ref_model.named_parameters())
    previous = ref_before
    for policy, ref in seen:
        for name, value in ref.items():
            expected = (1 - alpha) * previous[name] + alpha * policy[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        previous = ref
    assert not torch.equal(seen[-1][1]["model.embed_tokens.weight"], ref_before["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------------- beam search
@pytest.mark.parametrize(
    "kwargs",
    [{"num_beams": 2}, {"do_sample": False}, {"num_beam_groups": 2}, {"penalty_alpha": 0.6}],
)
@pytest.mark.parametrize("correction", ["alp", "bypass", "token_mis", "seq_mis", "tis"])
def test_decoding_that_does_not_sample_is_refused_with_a_correction(kwargs, correction):
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"`generation_kwargs` sets {key}=.*off_policy_correction='none'"):
        ALPConfig(output_dir="/tmp/x", off_policy_correction=correction, generation_kwargs=kwargs, use_cpu=True)
    # as JSON text from a recipe or the command line, too
    with pytest.raises(ValueError, match="generation_kwargs"):
        ALPConfig(
            output_dir="/tmp/x",
            off_policy_correction=correction,
            generation_kwargs=__import__("json").dumps(kwargs),
            use_cpu=True,
        )


def test_beam_search_still_trains_with_plain_grpo(make_model, tokenizer, prompt_dataset, train_args):
    args = ALPConfig(**train_args, off_policy_correction="none", generation_kwargs={"num_beams": 2})
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    before = named_params(trainer.model)
    trainer.train()
    assert "model.layers.0.mlp.up_proj.weight" in _changed(before, trainer.model)


# ------------------------------------------------------------------- generation the recorder cannot line up with
def _first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize(
    ("alteration", "reason"),
    [
        ("unhooked", "nothing was recorded"),
        ("batch", "captured 8 generated sequences but got 4 completions"),
        ("longer", "completion 0 has 9 tokens but 8 steps were captured"),
        ("tokens", "completion 0's tokens differ"),
    ],
)
def test_unusable_recordings_fall_back_to_one_clean_forward(
    make_model, tokenizer, prompt_dataset, train_args, caplog, alteration, reason
):
    """A `generate` that never runs the hooked forward, returns another batch, longer completions than it decoded, or
    other tokens: the recorded log-probs are dropped (with a warning naming why) and replaced by one noise-free forward
    of the policy; `alp/rollout_logps_recomputed` says so, and training goes on."""
    model = make_model()
    args = ALPConfig(**train_args, perturb_sigma_init=0.05)
    trainer = build_trainer(model, tokenizer, prompt_dataset, args)
    if alteration == "unhooked":
        model.generate = GenerateWithoutHookedForward(copy.deepcopy(model))
    else:
        model.generate = GenerateThenAlter(model.generate, alteration)
    trainer.model.train()
    with caplog.at_level(logging.WARNING, logger="alp_trl.trainer"):
        output = trainer._generate_and_score_completions(_first_batch(trainer))
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert reason in warning and "recomputed" in warning
    assert trainer._metrics["train"]["alp/rollout_logps_recomputed"] == [1.0]
    torch.testing.assert_close(output["sampling_per_token_logps"], trainer._unperturbed_policy_logps(output))
    before = named_params(trainer.model)
    trainer.train()
    assert "alp_perturbation.log_sigma" in _changed(before, trainer.model)


def test_recorded_logprobs_are_used_when_they_line_up(make_model, tokenizer, prompt_dataset, train_args):
    """The control of the test above: plain generation is recorded, not recomputed (no extra forward pass)."""
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, ALPConfig(**train_args))
    trainer.model.train()
    output = trainer._generate_and_score_completions(_first_batch(trainer))
    assert trainer._metrics["train"]["alp/rollout_logps_recomputed"] == [0.0]
    mask = output["completion_mask"].bool()
    clean = trainer._unperturbed_policy_logps(output)
    torch.testing.assert_close(output["sampling_per_token_logps"][mask], clean[mask], rtol=1e-4, atol=1e-4)


def test_mask_truncated_completions_trains_with_alp(make_model, tokenizer, prompt_dataset, train_args):
    args = ALPConfig(**{**train_args, "max_completion_length": 24}, mask_truncated_completions=True)
    trainer = build_trainer(make_model(), tokenizer, prompt_dataset, args)
    before = named_params(trainer.model)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "alp/rollout_logps_recomputed" in r]
    assert [r["alp/rollout_logps_recomputed"] for r in logged] == [0.0, 0.0]
    assert all(p == p for r in logged for p in (r["loss"],)), "finite losses"
    changed = _changed(before, trainer.model)
    assert any(r["completions/clipped_ratio"] < 1.0 for r in logged), "precondition: some completion terminated"
    assert {"alp_perturbation.log_sigma", "model.layers.0.mlp.up_proj.weight"} <= changed


# --------------------------------------------------------------------------------------- tools and environments
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


class AddEnvironment:
    """A TRL environment whose one tool is `add`."""

    def reset(self, **kwargs):
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return a + b


class OwnedEnvironment(AddEnvironment):
    """An environment that owns the data (its `reset` writes the question) and the reward (`get_reward`)."""

    instances = 0

    def __init__(self):
        type(self).instances += 1
        self.reward = 0.1 * (type(self).instances % 4)

    def reset(self, **kwargs):
        return "What is 3 + 4?"

    def get_reward(self):
        return self.reward


def _tool_script(row: int, prompt_text: str) -> str:
    """First turn: call `add`; after the tool's answer: a final answer whose digit differs by row (same length)."""
    if "<tool_response>" in prompt_text:
        return f"The answer is {row % 10}.<|im_end|>"
    return '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'


@pytest.mark.parametrize("correction", ["alp", "none"])
@pytest.mark.parametrize("how", ["tools", "environment", "environment_owned"])
def test_multi_turn_logprobs_line_up_with_completion_ids_and_tool_mask(make_model, train_args, how, correction):
    """TRL's tool / environment loop stitches two generation calls and a tool result: the stitched rollout log-probs
    equal, token for token, the policy's own log-probs of the stitched completion on the model's tokens (tool_mask 1),
    and are 0 on the tool's tokens; nothing is recomputed; ALP then trains on it."""
    from alp_trl.tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template  # a template TRL knows how to parse tool calls of
    model = make_model()
    model.config.max_position_embeddings = 2048  # the tool schema makes a ~720-token prompt with this tokenizer
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 3 + 4?"}]] * 16})
    if how == "environment_owned":  # no prompt column: each rollout's reset() supplies the question
        dataset = Dataset.from_dict({"id": list(range(16))})
    args = ALPConfig(
        **{**train_args, "max_completion_length": 200}, off_policy_correction=correction, perturb_sigma_init=0.05
    )
    extra = {
        "tools": {"tools": [add]},
        "environment": {"environment_factory": AddEnvironment},
        "environment_owned": {"environment_factory": OwnedEnvironment},
    }[how]

    def final_answer_reward(completions, **kwargs):  # the digit of the last message: differs by row
        return [float(c[-1]["content"].rstrip(".")[-1]) / 10 for c in completions]

    trainer = build_trainer(
        model,
        tokenizer,
        dataset,
        args,
        reward_funcs=None if how == "environment_owned" else final_answer_reward,
        **extra,
    )
    scripted = ScriptedGenerate(model, tokenizer, _tool_script)
    model.generate = scripted
    trainer.model.train()
    output = trainer._generate_and_score_completions(_first_batch(trainer))
    assert scripted.calls == 2, "two generation calls: before and after the tool"
    assert trainer._metrics["train"]["tools/call_frequency"] == [1.0]
    tool_mask, mask = output["tool_mask"].bool(), output["completion_mask"].bool()
    assert (mask & ~tool_mask).any() and (mask & tool_mask).any()
    if correction != "none":  # plain GRPO records nothing: TRL's own path
        assert trainer._metrics["train"]["alp/rollout_logps_recomputed"] == [0.0]
        sampled, clean = output["sampling_per_token_logps"], trainer._unperturbed_policy_logps(output)
        torch.testing.assert_close(sampled[mask & tool_mask], clean[mask & tool_mask], rtol=1e-4, atol=1e-4)
        assert torch.all(sampled[mask & ~tool_mask] == 0.0)
    text = tokenizer.decode(output["completion_ids"][0][mask[0]])
    assert "<tool_response>\n7\n</tool_response>" in text and text.endswith("The answer is 0.<|im_end|>")

    before = named_params(trainer.model)
    trainer.train()
    expected = {"model.layers.0.self_attn.q_proj.weight"} | (
        {"alp_perturbation.log_sigma"} if correction == "alp" else set()
    )
    assert expected <= _changed(before, trainer.model)


# ------------------------------------------------------------------------------------------------- rollout_func
@pytest.mark.parametrize("correction", ["alp", "bypass", "token_mis", "none"])
def test_rollout_func_logprobs_are_the_denominator(make_model, tokenizer, prompt_dataset, train_args, correction):
    """With TRL's `rollout_func`, the log-probs it returns are the rollout denominator, as returned (no recording,
    no recomputation, no state of the trainer's own generation path); training runs."""
    returned = {}

    @torch.no_grad()
    def rollout_func(prompts, trainer):
        """A rollout engine of one's own: fixed completions, scored by the policy with a small per-row offset (an
        engine mismatch), so that MIS keeps the tokens."""
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
        ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
        completions = [[7 + (i % 5), 9, 11 + (i % 3)] for i in range(len(prompts))]
        logprobs = []
        for row, (prompt, completion) in enumerate(zip(ids, completions)):
            logits = trainer.model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            true = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            logprobs.append((true + 0.05 * (row - 1.5)).tolist())
        returned["logprobs"] = logprobs
        return {"prompt_ids": ids, "completion_ids": completions, "logprobs": logprobs}

    model = make_model()
    args = ALPConfig(**train_args, off_policy_correction=correction, perturb_sigma_init=0.05)
    trainer = build_trainer(model, tokenizer, prompt_dataset, args, rollout_func=rollout_func)
    trainer.model.train()
    output = trainer._generate_and_score_completions(_first_batch(trainer))
    torch.testing.assert_close(output["sampling_per_token_logps"], torch.tensor(returned["logprobs"]))
    assert trainer._metrics["train"].get("alp/rollout_logps_recomputed", [0.0]) == [0.0]
    before = named_params(trainer.model)
    trainer.train()
    assert "model.layers.0.mlp.down_proj.weight" in _changed(before, trainer.model)
