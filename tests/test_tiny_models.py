"""The tiny local models and tokenizer (`alp_trl.tiny_models`): every architecture builds at the asked size,
reproducibly by seed; an unknown one is refused."""

import pytest
import torch

from alp_trl.tiny_models import ARCHITECTURES, build_tiny_causal_lm, build_tiny_tokenizer


def test_the_architectures():
    assert ARCHITECTURES == ("qwen2", "qwen3", "llama", "mistral", "gemma", "gpt2", "qwen3_moe")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_builds_and_is_reproducible_by_seed(arch):
    model = build_tiny_causal_lm(arch, vocab_size=64, num_layers=2, hidden_size=16)
    assert model.config.model_type == arch
    assert model.config.vocab_size == 64 and model.get_input_embeddings().weight.shape == (64, 16)
    assert model.config.num_hidden_layers == 2
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    logits = model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    same = build_tiny_causal_lm(arch, vocab_size=64, num_layers=2, hidden_size=16)
    other = build_tiny_causal_lm(arch, vocab_size=64, num_layers=2, hidden_size=16, seed=1)
    weights, other_weights = model.state_dict(), other.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in same.state_dict().items()), "same seed, same weights"
    assert any(not torch.equal(weights[k], v) for k, v in other_weights.items()), "another seed, other weights"


def test_the_moe_has_4_experts_2_per_token():
    config = build_tiny_causal_lm("qwen3_moe", vocab_size=64, num_layers=2).config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 16)


def test_an_unknown_architecture_is_refused_naming_the_allowed_values():
    with pytest.raises(ValueError) as error:
        build_tiny_causal_lm("gpt5")
    assert str(error.value) == (
        "`arch` got 'gpt5'; allowed values are ['qwen2', 'qwen3', 'llama', 'mistral', 'gemma', 'gpt2', 'qwen3_moe']."
    )


def test_the_tokenizer_round_trips_text_and_formats_chatml():
    tokenizer = build_tiny_tokenizer()
    text = "What is 12 + 7? \\boxed{19} ünïcode"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "<pad>", "left")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
