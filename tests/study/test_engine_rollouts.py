"""`alp_trl.study.engine_rollouts`: the vLLM engine's samples assembled into the trainer's batches, by value with a
scripted engine, and against the real engine's float32 log-probs."""

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ..test_vllm_engine import REPO, _subprocess_env, real_engine


class ScriptedLLM:
    """Stands in for `vllm.LLM.generate`: answers each prompt with the scripted completions (token ids and their
    log-probs) and keeps the sampling parameters it was given."""

    def __init__(self, completions: list[list[tuple[list[int], list[float]]]]):
        self.completions, self.params = completions, None

    def generate(self, prompts, params, use_tqdm=False):
        self.params = params
        assert len(prompts) == len(self.completions) and not use_tqdm
        return [
            SimpleNamespace(
                outputs=[
                    SimpleNamespace(
                        token_ids=tokens,
                        logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, logps)],
                    )
                    for tokens, logps in request
                ]
            )
            for request in self.completions
        ]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM's SamplingParams")
def test_vllm_samples_become_left_padded_prompts_and_right_padded_completions(tokenizer):
    from alp_trl.study.engine_rollouts import sample_vllm_rollouts

    prompts = ["ab", "a b c d"]  # plain strings: tokenized without special tokens
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len(ids[0]) < len(ids[1])
    llm = ScriptedLLM(
        [
            [([5, 6, 7], [-0.1, -0.2, -0.3]), ([8], [-0.4])],
            [([9, 10], [-0.5, -0.6]), ([11, 12, 13, 14], [-0.7, -0.8, -0.9, -1.0])],
        ]
    )
    batches = sample_vllm_rollouts(llm, tokenizer, prompts, 2, 4, 1.0, 3, 3)
    assert [b.prompt_ids.size(0) for b in batches] == [3, 1], "4 sequences in batches of 3"
    assert {b.completion_ids.size(1) for b in batches} == {4}, "every batch padded to the widest completion"
    first, second = batches
    pad = tokenizer.pad_token_id
    width = first.prompt_ids.size(1)
    assert width == len(ids[1])  # the first batch holds both prompts: the short one is left-padded
    assert first.prompt_ids[0].tolist() == [pad] * (width - len(ids[0])) + ids[0]
    assert first.prompt_mask[0].tolist() == [0] * (width - len(ids[0])) + [1] * len(ids[0])
    assert first.prompt_ids[2].tolist() == ids[1] and second.prompt_ids[0].tolist() == ids[1]
    assert first.completion_ids.tolist() == [[5, 6, 7, pad], [8, pad, pad, pad], [9, 10, pad, pad]]
    assert first.completion_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert torch.allclose(first.rollout_logps[0], torch.tensor([-0.1, -0.2, -0.3, 0.0]))
    assert torch.allclose(second.rollout_logps[0], torch.tensor([-0.7, -0.8, -0.9, -1.0]))
    # the engine seeds the j-th of n samples with seed + j: each prompt of unit seed 3 starts its own range of n
    assert [p.seed for p in llm.params] == [(3 * 2 + 0) * 2, (3 * 2 + 1) * 2] == [12, 14]
    assert all(p.n == 2 and p.max_tokens == 4 and p.logprobs == 0 for p in llm.params)


@real_engine
def test_coverage_rollouts_from_vllm_line_up_with_the_trainer(tmp_path):
    """The studies' vLLM engine (`study.engine_rollouts.sample_vllm_rollouts`): in float32 the engine's
    log-probs of its sampled tokens equal the trainer's forward over the assembled (left-padded prompt, right-padded
    completion) batches, token for token; so in bf16 the gap is the engine's, not the batching's."""
    script = (
        "import json, sys, torch\n"
        "from alp_trl.study.coverage_units import CoverageContext, prompts_of\n"
        "from alp_trl.study.engine_rollouts import sample_vllm_rollouts\n"
        "from alp_trl.intervention import policy_logps\n"
        "if __name__ == '__main__':\n"
        "    ctx = CoverageContext({'model': 'embedded:smollm2-135m-instruct'}, sys.argv[1])\n"
        "    model, tok = ctx.model('embedded:smollm2-135m-instruct')\n"
        "    llm = ctx.engines.get('embedded:smollm2-135m-instruct', 'float32', 0)\n"
        "    batches = sample_vllm_rollouts(llm, tok, prompts_of(tok, {'num_prompts': 3}), 2, 12, 1.0, 0, 4)\n"
        "    mask = torch.cat([b.completion_mask for b in batches]).bool()\n"
        "    gap = (policy_logps(model, batches, None, 1.0) - torch.cat([b.rollout_logps for b in batches]))[mask]\n"
        "    print(json.dumps({'rows': int(mask.size(0)), 'tokens': int(mask.sum()), 'max_gap': gap.abs().max().item(),\n"
        "                      'widths': [b.completion_ids.size(1) for b in batches]}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["rows"] == 6 and measured["tokens"] > 12
    assert len(set(measured["widths"])) == 1  # padded to one width
    assert measured["max_gap"] < 1e-3
