"""The sampling log-probs recorded during `generate` equal those of a training forward over the same tokens."""

import torch
from transformers import GenerationConfig

from alp_trl.rollout_logprobs import capture_generation_logprobs
from alp_trl.tiny_models import build_tiny_causal_lm


def _forward_logps(model, prompt_ids, prompt_mask, completion, temperature):
    ids = torch.cat([prompt_ids, completion], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_ids.size(1) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def test_captured_logprobs_match_a_forward_pass(tokenizer):
    model = build_tiny_causal_lm("qwen2", vocab_size=len(tokenizer)).eval()
    batch = tokenizer(["What is 1 + 1?", "Add 20 and 22 please"], return_tensors="pt", padding=True)
    temperature = 0.7
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=12,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with capture_generation_logprobs(model, temperature) as recorder:
        out = model.generate(**batch, generation_config=config)
    completion = out[:, batch.input_ids.size(1) :]
    # cut one sequence short, as TRL does after EOS: its log-probs must be cut the same way
    completion_lists = [completion[0].tolist(), completion[1, :5].tolist()]
    captured = recorder.logprobs_for(completion_lists)
    assert [len(c) for c in captured] == [completion.size(1), 5]
    expected = _forward_logps(model, batch.input_ids, batch.attention_mask, completion, temperature)
    torch.testing.assert_close(torch.tensor(captured[0]), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(captured[1]), expected[1, :5], atol=1e-5, rtol=0)
    # the hook is gone after the context: a later forward does not record anything
    calls = recorder.num_calls
    with torch.no_grad():
        model(**batch)
    assert recorder.num_calls == calls
