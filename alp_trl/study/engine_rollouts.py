"""Rollouts from a study's engine, shared by the `coverage` and `intervention` experiments.

An engine is a simulated one (`rollout_mismatch` + `rollout_mismatch_std`: transformers generation from a modified
copy of the policy, `intervention.sample_rollouts`) or the real vLLM engine (`engine: vllm`, with `dtype`), whose own
log-probs of the tokens it sampled are the rollout log-probs. One vLLM engine is held at a time (`VLLMEngines`).
"""

import os

import torch

from ..intervention import RolloutBatch, pad_batches, sample_rollouts


class VLLMEngines:
    """The vLLM engine of one (model path, dtype) at a time, in this process (eager on a CPU), reused across seeds
    and experiments until another model or dtype is asked for."""

    def __init__(self):
        self._key = self._llm = None

    def close(self) -> None:
        """Let the engine go (before a training run that needs the memory; the next `get` starts a new one)."""
        if self._llm is not None:
            import gc

            self._key = self._llm = None
            gc.collect()

    def get(self, path: str, dtype: str, seed: int):
        from ..model_loading import resolve_model_path

        key = (path, dtype)
        if self._key != key:
            self._llm = None
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm import LLM

            options = {} if torch.cuda.is_available() else {"enforce_eager": True}
            self._llm = LLM(
                model=resolve_model_path(path),
                dtype=dtype,
                seed=seed,
                max_model_len=1024,
                logprobs_mode="processed_logprobs",
                **options,
            )
            self._key = key
        return self._llm


def sample_vllm_rollouts(
    llm, tokenizer, prompts: list, num_generations: int, max_new_tokens: int, temperature: float, seed: int, size: int
) -> list[RolloutBatch]:
    """Rollouts sampled by a vLLM engine (untruncated), with the engine's own log-probs of the sampled tokens, as
    `RolloutBatch`es of `size` sequences (prompts left-padded, completions right-padded) for the trainer's forward."""
    from vllm import SamplingParams

    ids = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if not isinstance(p, str)
        else tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    # vLLM seeds the j-th of n samples with `seed + j`: disjoint seed ranges per prompt and per unit seed, so that no
    # two prompts or unit seeds share a random stream
    params = [
        SamplingParams(
            n=num_generations,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_tokens=max_new_tokens,
            logprobs=0,
            seed=(seed * len(ids) + index) * num_generations,
        )
        for index in range(len(ids))
    ]
    outputs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
    rows = []
    for prompt_ids, request in zip(ids, outputs):
        for completion in request.outputs:
            tokens = list(completion.token_ids)
            logps = [lp[token].logprob for token, lp in zip(tokens, completion.logprobs)]
            rows.append((prompt_ids, tokens, logps))
    pad = tokenizer.pad_token_id
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        prompt_width = max(len(r[0]) for r in chunk)
        width = max(max(len(r[1]) for r in chunk), 1)
        prompt = torch.full((len(chunk), prompt_width), pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt)
        completion = torch.full((len(chunk), width), pad, dtype=torch.long)
        completion_mask = torch.zeros_like(completion)
        rollout = torch.zeros(completion.shape)
        for row, (p, c, lp) in enumerate(chunk):
            prompt[row, prompt_width - len(p) :] = torch.tensor(p)
            prompt_mask[row, prompt_width - len(p) :] = 1
            completion[row, : len(c)] = torch.tensor(c, dtype=torch.long)
            completion_mask[row, : len(c)] = 1
            rollout[row, : len(lp)] = torch.tensor(lp)
        batches.append(RolloutBatch(prompt, prompt_mask, completion, completion_mask, rollout))
    return pad_batches(batches)


def sample_engine_rollouts(
    model, tokenizer, engines: VLLMEngines, model_path: str, prompts: list, engine: dict, data: dict, seed: int
) -> list[RolloutBatch]:
    """The rollouts of `prompts` from `engine` (the policy `model`, loaded from `model_path`, for a simulated engine;
    a vLLM engine on `model_path` for the real one), with the experiment's `data` settings (`num_generations`,
    `max_new_tokens`, `temperature`, `batch_size`)."""
    generations, max_new_tokens = data.get("num_generations", 4), data.get("max_new_tokens", 32)
    temperature, size = data.get("temperature", 1.0), data.get("batch_size", 16)
    torch.manual_seed(seed)
    if engine.get("engine") == "vllm":
        llm = engines.get(model_path, engine.get("dtype", "bfloat16"), seed)
        batches = sample_vllm_rollouts(llm, tokenizer, prompts, generations, max_new_tokens, temperature, seed, size)
        device = next(model.parameters()).device  # where the simulated engines' rollouts are too
        return [RolloutBatch(*(t.to(device) for t in batch)) for batch in batches]
    return pad_batches(
        sample_rollouts(
            model,
            tokenizer,
            prompts,
            generations,
            max_new_tokens,
            temperature,
            engine.get("rollout_mismatch", "none"),
            engine.get("rollout_mismatch_std", 0.0),
            seed,
            size,
        )
    )
