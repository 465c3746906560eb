"""Capture the log-probs of the sampled tokens from a transformers `generate` call, without an extra forward pass.

When vLLM generates, TRL already receives the sampling log-probs from the engine. With plain transformers generation
it does not, so ALP's denominator would need another forward pass. `capture_generation_logprobs` instead records them
while `generate` runs: a forward hook on the causal LM sees, at every decoding step, the logits of the next token and
the token sampled at the previous step (it is the input of the current step). It keeps only one `(batch, vocab)`
distribution at a time.

The log-probs are `log_softmax(logits / temperature)`, the same processing TRL's trainer applies to its own log-probs.
Sampling with `top_p < 1`, `top_k > 0` or `min_p` draws from a truncated distribution: with a `truncation`
(`alp_trl.sampling_replay`) the recorder reports the log-probs of that truncated, renormalised distribution, as vLLM's
`processed_logprobs` do, and the trainer's numerator is replayed over the same rule. A repetition penalty reshapes the
distribution in a way neither side replays.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .sampling_replay import SamplingTruncation, kept_tokens, truncated_log_softmax


class RecordingMismatch(RuntimeError):
    """The recorded generation does not line up with the completions it is asked about."""


class GenerationLogprobRecorder:
    """State of one capture: per-step log-probs of the tokens sampled so far, and the pending distribution."""

    def __init__(self, temperature: float, truncation: SamplingTruncation | None = None):
        self.temperature = float(temperature)
        self.truncation = truncation if truncation is not None and truncation.active else None
        self.steps: list[torch.Tensor] = []  # step t -> (B,) log-prob of the token sampled at step t
        self.tokens: list[torch.Tensor] = []  # step t -> (B,) the token sampled at step t (seen as the next input)
        self.pending: torch.Tensor | None = None  # (B, V) log-probs of the distribution sampled at the last step
        self.num_calls = 0
        self.broken: str | None = None  # why the recording cannot be aligned (the hook never raises into generate)

    def hook(self, module, args, kwargs, output) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output["logits"] if not isinstance(output, tuple) else output[0]
        if input_ids is None or logits is None or self.broken is not None:
            return
        if self.pending is not None:
            # The input of this step is the token sampled from the pending distribution.
            sampled = input_ids[:, -1:].to(self.pending.device)
            if sampled.size(0) != self.pending.size(0):  # another batch, e.g. a second generate call
                self.broken = (
                    f"the decoding batch changed size between steps ({self.pending.size(0)} -> {sampled.size(0)})"
                )
                return
            self.steps.append(self.pending.gather(-1, sampled).squeeze(-1))
            self.tokens.append(sampled.squeeze(-1).cpu())
        scaled = logits[:, -1, :].float() / self.temperature
        if self.truncation is None:
            self.pending = torch.log_softmax(scaled, dim=-1)
        else:  # the sampler's truncated, renormalised distribution (the sampled token is always inside it)
            self.pending = truncated_log_softmax(scaled, kept_tokens(scaled, self.truncation))
        self.num_calls += 1

    def logprobs_for(self, completion_ids: list[list[int]]) -> list[list[float]]:
        """Per-sequence log-probs of `completion_ids` (the sampled tokens, possibly cut after EOS).

        Raises `RecordingMismatch` when the recording cannot be the generation of these completions: nothing was
        recorded (the backend never ran the hooked forward pass), another number of sequences, a completion longer
        than the recorded decoding steps, or recorded tokens that differ from the completion's.
        """
        if self.broken is not None:
            raise RecordingMismatch(self.broken)
        if self.pending is None:
            raise RecordingMismatch("nothing was recorded: the generation backend never ran the policy's forward pass")
        num_steps = len(self.steps) + 1
        if len(completion_ids) != self.pending.size(0):
            raise RecordingMismatch(
                f"captured {self.pending.size(0)} generated sequences but got {len(completion_ids)} completions"
            )
        columns = torch.stack(self.steps, dim=1).cpu() if self.steps else torch.empty(len(completion_ids), 0)
        tokens = torch.stack(self.tokens, dim=1) if self.tokens else torch.empty(len(completion_ids), 0)
        last = self.pending.cpu()
        result = []
        for row, ids in enumerate(completion_ids):
            if len(ids) > num_steps:
                raise RecordingMismatch(f"completion {row} has {len(ids)} tokens but {num_steps} steps were captured")
            known = min(len(ids), num_steps - 1)
            if tokens[row, :known].tolist() != list(ids[:known]):
                raise RecordingMismatch(f"completion {row}'s tokens differ from the tokens sampled while recording")
            values = columns[row, :known].tolist()
            if len(ids) == num_steps:
                values.append(float(last[row, ids[-1]]))
            result.append(values)
        return result


def rollout_logprobs_misalignment(
    completion_ids: list[list[int]], logprobs: list[list[float]] | None, tool_mask: list[list[int]] | None = None
) -> str | None:
    """Why `logprobs` cannot be the per-token rollout log-probs of `completion_ids` (and of `tool_mask`, when TRL's
    tool / environment loop stitched several generation calls together), or `None` when they line up."""
    if logprobs is None:
        return None
    if len(logprobs) != len(completion_ids):
        return f"{len(logprobs)} log-prob sequences for {len(completion_ids)} completions"
    for row, (ids, values) in enumerate(zip(completion_ids, logprobs)):
        if values is None or len(values) != len(ids):
            return f"completion {row} has {len(ids)} tokens but {0 if values is None else len(values)} log-probs"
        if tool_mask is not None and len(tool_mask[row]) != len(ids):
            return f"completion {row} has {len(ids)} tokens but a tool mask of {len(tool_mask[row])}"
    return None


@contextmanager
def capture_generation_logprobs(
    model: nn.Module, temperature: float = 1.0, truncation: SamplingTruncation | None = None
) -> Iterator[GenerationLogprobRecorder]:
    """
    Record the log-probs of the tokens sampled by `model.generate` inside this context.

    `model` is the causal LM whose forward `generate` calls at every step (for a PEFT model, its base model). Use
    `recorder.logprobs_for(completion_ids)` after `generate` returns. With an active `truncation` (the sampler's
    `top_k` / `top_p` / `min_p`) the log-probs are those of the truncated, renormalised distribution.
    """
    recorder = GenerationLogprobRecorder(temperature, truncation)
    handle = model.register_forward_hook(recorder.hook, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()


@torch.no_grad()
def sample_with_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    mismatch: str = "none",
    mismatch_std: float = 0.0,
    seed: int = 0,
) -> tuple[list[list[int]], list[list[float]]]:
    """
    Sample one completion per (left-padded) prompt from `model`, optionally turned into a simulated inference engine
    (`alp_trl.simulated_engine`), with untruncated sampling (`top_p=1`, `top_k=0`). Returns each completion's token ids
    (cut after the first EOS) and the sampling log-probs of those tokens.
    """
    from transformers import GenerationConfig

    from .simulated_engine import simulated_sampler

    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    torch.manual_seed(seed)
    with (
        simulated_sampler(model, mismatch, mismatch_std, seed),
        capture_generation_logprobs(causal_lm, temperature) as recorder,
    ):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    completions = []
    for row in out[:, input_ids.size(1) :].tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        completions.append(row)
    return completions, recorder.logprobs_for(completions)


def missing_rollout_logps_warning(problem: str | None, args) -> str:
    """The warning when a generation batch's rollout log-probs are unusable and the unperturbed policy's are
    recomputed in their place (which hides the engine's mismatch from the ratio)."""
    cause = f"Rollout log-probs unusable ({problem})" if problem else "The generation backend returned no log-probs"
    simulated = " (and the simulated one of rollout_mismatch)" if args.rollout_mismatch != "none" else ""
    return (
        f"{cause}; off_policy_correction={args.off_policy_correction!r} uses the log-probs of the unperturbed policy "
        "recomputed after generation instead (one extra forward pass per generation batch; counted in "
        f"alp/rollout_logps_recomputed). This ignores any train-inference mismatch of the backend{simulated}. Shown once."
    )
