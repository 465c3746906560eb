"""A simulated inference engine (the rollout-mismatch simulator): sample from a deliberately different copy of the policy, on CPU, without vLLM.

On a GPU, vLLM's sampling policy is reported to differ from the trainer's even at identical weights (kernels,
batching, precision): a mean per-token |log-prob difference| around 0.01, with occasional token-probability
differences near 1 (reported figures, not measured here; vLLM's CPU build in bf16 against the fp32 trainer differs by
a mean 0.033, max 0.39, docs/vllm.md). On CPU in
fp32, transformers generation and the training forward agree to ~1e-6, so that mismatch has to be made on purpose.
`simulated_sampler(model, kind, std)` turns the policy into such a sampler for the duration of `generate`:

- `"bf16"` / `"fp16"`: every weight rounded to that precision (the sampler of a lower-precision inference engine;
  for SmolLM2-135M, bf16 gives a mean |dlogp| ~0.03 per token, the order of magnitude reported for vLLM);
- `"bf16_activations"`: the whole forward in bf16, weights and activations (what a bf16 engine computes; rotary
  tables and the log-probs in float32). Single-process models only (not under FSDP / DeepSpeed);
- `"logit_noise"`: Gaussian noise of std `std` added to the sampler's logits;
- `"hidden_noise"`: Gaussian noise of std `std` added to the input hidden state of every decoder layer (the paper's
  own mismatch model and the same family as ALP's perturbation: the positive control of the marginal-coverage test,
  where on SmolLM2 the noise-averaged policy came closer to it at std 0.1 but not at 0.02, docs/coverage.md; prefer
  the other kinds when comparing methods).

The weights are restored bit-exactly when the context exits. The tokens are sampled from the modified policy and the
recorded sampling log-probs are that policy's, so they become the rollout denominator, exactly as vLLM's would.
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .config import MISMATCH_KINDS
from .perturbation import MODULE_NAME, find_decoder_layers, noise_seed


NOISE_KINDS = ("logit_noise", "hidden_noise")
_ROUNDING = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def _rounded_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The weights rounded to `dtype` inside the context, restored bit for bit on the way out, whatever happens (the
    rounding itself is inside the `try`: an interruption half-way through restores what was already rounded)."""
    originals = {}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if MODULE_NAME in name.split(".") or not param.is_floating_point() or param.dtype == dtype:
                    continue
                originals[name] = param.detach().clone()
                param.copy_(param.to(dtype).to(param.dtype))
        yield
    finally:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, original in originals.items():
                params[name].copy_(original)


def _gaussian(like: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    return (std * noise).to(like.dtype)


@contextmanager
def _bf16_forward(model: nn.Module) -> Iterator[None]:
    """The model's parameters in bf16 inside the context, so that every activation is bf16 too; buffers (RoPE's
    inverse frequencies) stay float32, as an engine builds its rotary tables in float32. Each parameter gets its own
    tensor and gradient back on the way out, bit for bit, whatever happens."""
    saved = [(p, p.data, p.grad) for p in model.parameters() if p.is_floating_point()]
    try:
        for param, data, _ in saved:
            param.data = data.to(torch.bfloat16)
            param.grad = None
        yield
    finally:
        for param, data, grad in saved:
            param.data = data
            param.grad = grad


@contextmanager
def _logit_noise(model: nn.Module, std: float, generator: torch.Generator) -> Iterator[None]:
    head = model.get_output_embeddings()

    def add_noise(module, args, output):
        return output + _gaussian(output, std, generator)

    handle = head.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _hidden_noise(model: nn.Module, std: float, generator: torch.Generator) -> Iterator[None]:
    _, layers = find_decoder_layers(model)

    def add_noise(layer, args, kwargs):
        if args:
            return (args[0] + _gaussian(args[0], std, generator), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden + _gaussian(hidden, std, generator)}

    handles = [layer.register_forward_pre_hook(add_noise, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def simulated_sampler(
    model: nn.Module, kind: str = "none", std: float = 0.0, seed: int = 0, step: int = 0
) -> Iterator[nn.Module]:
    """Make `model` a different sampling policy inside the context (`kind` in `MISMATCH_KINDS`); no-op for "none"."""
    if kind not in MISMATCH_KINDS:
        raise ValueError(f"`rollout_mismatch` got {kind!r}; allowed values are {list(MISMATCH_KINDS)}.")
    with ExitStack() as stack:
        if kind in _ROUNDING:
            stack.enter_context(_rounded_weights(model, _ROUNDING[kind]))
        elif kind == "bf16_activations":
            stack.enter_context(_bf16_forward(model))
        elif kind in NOISE_KINDS:
            device = next(model.parameters()).device
            generator = torch.Generator(device=device)
            generator.manual_seed(noise_seed(seed, step, 0x5A4D))
            context = _logit_noise if kind == "logit_noise" else _hidden_noise
            stack.enter_context(context(model, std, generator))
        yield model
