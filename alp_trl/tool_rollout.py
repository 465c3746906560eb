"""Multi-turn tool-integrated reasoning in the SimpleTIR style: the model writes Python, the sandbox runs it.

A trajectory is a sequence of model turns. In each turn the model generates freely; if its text contains a fenced
```` ```python ... ``` ```` block before any final answer, the turn is cut right after that block (the tokens sampled
after it are dropped, as a stop sequence would), the code runs in `alp_trl.sandbox`, and its output is appended as a
fenced ```` ```output ... ``` ```` block: *tool tokens*, context for the next turn, never trained (mask 0, no rollout
log-prob). The model then continues from the whole history, up to `max_turns` turns. A turn with a final answer
(`\\boxed{...}`) ends the trajectory; a complete turn (it ended with EOS) with neither code nor a final answer is a
*void turn*: it ends the trajectory too and, with `void_turn_filter`, leaves the trajectory out of the loss
(SimpleTIR's filtering). Model and tool tokens together never exceed `max_completion_length`: a tool output that
does not fit ends the trajectory without it, so no tool result is ever split.

Tool outputs are neutralised before they enter the context: a ```` ``` ```` fence inside them cannot close the output
block, and a `\\boxed{}` inside them cannot pass for the model's answer.

`run_tir` is the loop over any generation function (the trainer's, so that every model token's rollout log-prob is
recorded per turn; or plain `generate` for evaluation); `trainer_tir_rollout` adapts it to TRL's `rollout_func`.
"""

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .sandbox import STATUSES, SandboxResult, run_python_batch


logger = logging.getLogger(__name__)

CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
FINAL_ANSWER = "\\boxed{"
FAILURE_KINDS = tuple(s for s in STATUSES if s != "ok")


def first_code_block(text: str) -> tuple[str, int] | None:
    """The code of the first complete ```python block and the index just after its closing fence, or None."""
    match = CODE_BLOCK.search(text)
    return None if match is None else (match.group(1), match.end())


def has_final_answer(text: str) -> bool:
    return FINAL_ANSWER in text


def format_tool_output(result: SandboxResult) -> str:
    """The text appended after a code block: the output in a fenced ```output block, neutralised."""
    output = result.output.replace("```", "'''").replace("\\boxed", "\\ boxed").rstrip()
    if result.status == "ok" and not output:
        output = "(no output)"
    elif result.status == "unavailable":
        output = "The Python tool is unavailable; the code was not run."
    return f"\n```output\n{output}\n```\n"


def token_prefix_for_chars(tokenizer, ids: list[int], end_char: int) -> int:
    """The fewest leading tokens of `ids` whose decoded text covers its first `end_char` characters (binary search)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= end_char:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class TIRStats:
    """What the loop did, per completion."""

    turns: list[int]
    calls: list[int]
    void_stop: list[bool]
    failures: dict[str, list[int]] = field(default_factory=dict)
    tool_tokens: list[int] = field(default_factory=list)
    model_tokens: list[int] = field(default_factory=list)
    examples: list[tuple[str, str, str]] = field(default_factory=list)


def run_tir(
    generate: Callable[[list[list[int]], bool], tuple[list[list[int]], list[list[float]] | None]],
    tokenizer,
    prompt_ids: list[list[int]],
    max_completion_length: int,
    max_turns: int = 5,
    code_timeout: float = 5.0,
    code_memory_mb: int = 1024,
    void_turn_filter: bool = True,
    eos_token_ids: tuple[int, ...] = (),
    execute: Callable[[list[str]], list[SandboxResult]] | None = None,
):
    """
    Run the multi-turn loop for a batch of prompts (token ids).

    `generate(inputs, first_turn)` returns, for every input token list, the new completion tokens (cut after EOS) and
    their rollout log-probs (or `None` when the backend gives none). `execute` runs a batch of code snippets
    (default: the sandbox, concurrently). Returns `(completion_ids, logprobs or None, tool_mask, stats)`, where
    `tool_mask` is 1 on model tokens and 0 on tool tokens (all 0 for a filtered void trajectory).
    """
    if execute is None:

        def execute(codes):
            return run_python_batch(codes, timeout=code_timeout, memory_mb=code_memory_mb)

    n = len(prompt_ids)
    completion = [[] for _ in range(n)]
    logprobs: list[list[float]] | None = [[] for _ in range(n)]
    mask = [[] for _ in range(n)]
    stats = TIRStats([0] * n, [0] * n, [False] * n, {k: [0] * n for k in FAILURE_KINDS}, [0] * n, [0] * n)
    active = list(range(n))
    for turn in range(max_turns):
        if not active:
            break
        new_ids, new_logps = generate([prompt_ids[i] + completion[i] for i in active], turn == 0)
        if new_logps is None:
            logprobs = None
        pending = {}
        for row, i in enumerate(active):
            room = max_completion_length - len(completion[i])
            tokens = list(new_ids[row])[:room]
            values = list(new_logps[row])[: len(tokens)] if new_logps is not None else None
            stats.turns[i] += 1
            text = tokenizer.decode(tokens, skip_special_tokens=False)
            block = first_code_block(text)
            if block is not None and not has_final_answer(text[: block[1]]) and turn < max_turns - 1:
                cut = token_prefix_for_chars(tokenizer, tokens, block[1])
                tokens = tokens[:cut]
                values = values[:cut] if values is not None else None
                pending[i] = block[0]
            finished = bool(tokens) and tokens[-1] in eos_token_ids
            if i not in pending and finished and not has_final_answer(text):
                stats.void_stop[i] = True
            completion[i] += tokens
            mask[i] += [1] * len(tokens)
            stats.model_tokens[i] += len(tokens)
            if logprobs is not None:
                logprobs[i] += values
        if not pending:
            break
        order = list(pending)
        results = execute([pending[i] for i in order])
        still = []
        for i, result in zip(order, results):
            if len(stats.examples) < 2:
                stats.examples.append((pending[i], result.status, result.output[:300]))
            stats.calls[i] += 1
            if result.status != "ok":
                stats.failures[result.status][i] += 1
            output_ids = tokenizer(format_tool_output(result), add_special_tokens=False).input_ids
            if len(completion[i]) + len(output_ids) >= max_completion_length:
                continue  # the output does not fit with room for the model to read it: stop without it
            completion[i] += output_ids
            mask[i] += [0] * len(output_ids)
            stats.tool_tokens[i] += len(output_ids)
            if logprobs is not None:
                logprobs[i] += [0.0] * len(output_ids)
            still.append(i)
        active = still
    if void_turn_filter:
        for i in range(n):
            if stats.void_stop[i]:
                mask[i] = [0] * len(mask[i])
    return completion, logprobs, mask, stats


def trainer_tir_rollout(prompts: list, trainer) -> dict:
    """TRL `rollout_func` running `run_tir` through the trainer's own generation path, turn by turn: transformers
    generation records every model token's log-prob while it samples, vLLM reports them; `env_mask` becomes TRL's
    `tool_mask`. Logs the `tools/*` metrics."""
    import torch

    args = trainer.args
    mode = "train" if trainer.model.training else "eval"
    prompt_ids, images, multimodal_fields = trainer._tokenize_prompts(prompts)
    num_generations = trainer.num_generations if mode == "train" else trainer.num_generations_eval

    def generate(inputs, first_turn):
        return trainer._generate_single_turn(inputs, None, {}, num_generations if first_turn else 1)

    completion_ids, logprobs, tool_mask, stats = run_tir(
        generate,
        trainer._tokenizer,
        [list(p) for p in prompt_ids],
        args.max_completion_length,
        args.max_turns,
        args.code_timeout,
        args.code_memory_mb,
        args.void_turn_filter,
        tuple(trainer.eos_token_ids),
    )
    if trainer.accelerator.is_main_process:
        for code, status, output in stats.examples[:1]:
            logger.info(
                "Tool call (%s):\n%s\n-> %s", status, code.strip()[:300], output.strip()[:300] or "(no output)"
            )
    columns = [stats.calls, stats.turns, [float(v) for v in stats.void_stop], stats.tool_tokens, stats.model_tokens]
    columns += [stats.failures[k] for k in FAILURE_KINDS]
    local = torch.tensor(columns, dtype=torch.float32, device=trainer.accelerator.device).sum(-1)
    count = torch.tensor([float(len(prompt_ids))], device=trainer.accelerator.device)
    totals = trainer.accelerator.reduce(torch.cat([local, count]), reduction="sum").tolist()
    completions = max(totals[-1], 1.0)
    metrics = trainer._metrics[mode]
    metrics["tools/calls_per_completion"].append(totals[0] / completions)
    metrics["tools/turns_per_completion"].append(totals[1] / completions)
    metrics["tools/void_turn_stops"].append(totals[2] / completions)
    metrics["tools/tool_token_frac"].append(totals[3] / max(totals[3] + totals[4], 1.0))
    for offset, kind in enumerate(FAILURE_KINDS):
        metrics[f"tools/failures/{kind}"].append(totals[5 + offset] / completions)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "env_mask": tool_mask}


def tool_rollout_func(trainer_kwargs: dict):
    """The `rollout_func` of `code_tool="python"` (`trainer_tir_rollout`), refused beside TRL's own tool or
    environment loops or another `rollout_func` in the trainer's keyword arguments."""
    for name in ("rollout_func", "tools", "environment_factory"):
        if trainer_kwargs.get(name):
            raise ValueError(
                f"`code_tool='python'` runs its own multi-turn loop and cannot be combined with `{name}`: use one or "
                "the other (TRL's tools / environments, or code_tool)."
            )
    return trainer_tir_rollout
