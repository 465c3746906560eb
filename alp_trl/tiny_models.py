"""Tiny, locally built tokenizer and decoder LMs for tests, benchmarks and GPU checks (no Hub access needed).

`build_tiny_tokenizer()` trains a byte-level BPE tokenizer on a small built-in corpus and gives it a ChatML chat
template; `build_tiny_causal_lm(arch)` builds a randomly initialised model of a given architecture (Qwen2, Qwen3,
Llama, Mistral, Gemma, GPT-2, Qwen3-MoE) sized for CPU tests.
"""

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
_CORPUS = [
    "What is 12 + 7? The answer is \\boxed{19}.",
    "Compute 3 * 4 - 5. We get 12 - 5 = 7, so the answer is \\boxed{7}.",
    "user assistant system You are a helpful assistant. Solve the problem step by step.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } [ ]",
    "If x = 2 and y = 3, then x + y = 5 and x * y = 6. Final answer: 5.",
]


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with a ChatML template, eos `<|im_end|>` and pad `<pad>`."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


ARCHITECTURES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gpt2", "qwen3_moe")


def tiny_config(arch: str, vocab_size: int, num_layers: int = 3, hidden_size: int = 32):
    """A small config of the given architecture (`ARCHITECTURES`)."""
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            bos_token_id=2,
            eos_token_id=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch in ("qwen3", "gemma", "qwen3_moe"):
        common["head_dim"] = hidden_size // 4
    if arch == "qwen3_moe":  # 4 experts, 2 per token, each half the dense MLP's width
        common.update(moe_intermediate_size=hidden_size // 2, num_experts=4, num_experts_per_tok=2)
    return AutoConfig.for_model(arch, **common)


def build_tiny_causal_lm(
    arch: str = "qwen2", vocab_size: int | None = None, num_layers: int = 3, hidden_size: int = 32, seed: int = 0
):
    """A randomly initialised causal LM of architecture `arch` (float32, no dropout), reproducible by `seed`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"`arch` got {arch!r}; allowed values are {list(ARCHITECTURES)}.")
    vocab_size = vocab_size if vocab_size is not None else len(build_tiny_tokenizer())
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, num_layers, hidden_size)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
