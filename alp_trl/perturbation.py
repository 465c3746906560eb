"""Layerwise Gaussian perturbation of a decoder LM's hidden states, the "P" of ALP.

`LayerwisePerturbation` owns one `log_sigma` per selected layer (a scalar, or one per hidden unit) and attaches to the
decoder layers of any Hugging Face causal LM through forward pre-hooks: no model class is patched. It is registered as
a submodule of the model (under `alp_perturbation`) so that DDP, DeepSpeed and FSDP see and synchronise its parameters,
and the noise is added by calling the module itself, so that ZeRO-3 gathers its parameters like any other module's.

Noise is added only inside `active(step, micro_step)`, the context the trainer opens around the policy-update forward
pass. Generation, evaluation, reference and old-policy log-probs never see it. If a model re-runs a layer's hooks while
recomputing a gradient checkpoint during backward, the noise of that layer is reproduced exactly, because `eps` is a
deterministic function of (seed, step, micro-step, process rank, layer index).
"""

import json
import logging
import math
import os
import re
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file
from torch import nn


logger = logging.getLogger(__name__)

MODULE_NAME = "alp_perturbation"
SIDE_FILE = "alp_perturbation.safetensors"
SIDE_CONFIG_FILE = "alp_perturbation.json"
_NON_TEXT_HINTS = ("vision", "visual", "image", "audio", "speech", "encoder.")
_MASK64 = (1 << 64) - 1
# The layer selections, sigma shapes and noise scales (here, not in the config: this module needs no TRL).
LAYER_SPECS = ("all", "early", "middle", "late", "final_hidden", "none")
# Old name of "final_hidden", still accepted: it perturbs the final hidden state (before the LM head), not the logits.
_LAYER_SPEC_ALIASES = {"logits": "final_hidden"}
SIGMA_SHAPES = ("scalar", "channel")
NOISE_SCALES = ("absolute", "rms")


def parse_layer_spec(value, field_name: str = "perturb_layers") -> str | list[int]:
    """Normalise a layer selection: one of `LAYER_SPECS`, or a list of layer indices (list, or "0,3,5" / "[0, 3]")."""
    allowed = f"one of {list(LAYER_SPECS)} or a list of layer indices such as [0, 5, 11]"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _LAYER_SPEC_ALIASES:
            logger.warning(
                "`%s=%r` perturbs the final hidden state (the LM head's input), not the logits: it is now called %r.",
                field_name,
                text,
                _LAYER_SPEC_ALIASES[text],
            )
            return _LAYER_SPEC_ALIASES[text]
        if text in LAYER_SPECS:
            return text
        if re.fullmatch(r"\[?\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*\]?", text):
            return [int(tok) for tok in re.findall(r"-?\d+", text)]
        raise ValueError(f"`{field_name}` got {value!r}; expected {allowed}.")
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"`{field_name}` got {value!r}; expected {allowed} (a non-empty list of integers).")
        return [int(v) for v in value]
    raise ValueError(f"`{field_name}` got {value!r} of type {type(value).__name__}; expected {allowed}.")


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """
    Find the stack of decoder layers of a (possibly PEFT-wrapped) causal LM: the `nn.ModuleList` whose length is the
    config's number of hidden layers and whose children share one class (`model.layers` for Llama, Qwen, Mistral,
    Gemma; `transformer.h` for GPT-2; ...). Vision / audio towers of multimodal models are skipped. `layers_path`
    (a dotted path such as `"model.layers"`) overrides the search.
    """
    if layers_path is not None:
        module = model.get_submodule(layers_path)
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            raise ValueError(f"`{layers_path}` is not a non-empty nn.ModuleList of decoder layers.")
        return layers_path, module
    num_layers = _config_int(_text_config(model), "num_hidden_layers", "n_layer", "num_layers")
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if num_layers is not None and len(module) != num_layers:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if any(hint in name.lower() for hint in _NON_TEXT_HINTS):
            continue
        candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__} (looked for an nn.ModuleList of "
            f"{num_layers} identical layers). Pass the dotted path of the layer list explicitly."
        )
    # Several lists of the same length (e.g. an encoder-decoder): the shortest path is the main stack.
    return min(candidates, key=lambda item: item[0].count("."))


def resolve_layer_indices(spec: str | list[int], num_layers: int) -> tuple[list[int], bool]:
    """
    Turn a layer selection into sorted layer indices and a flag for the final hidden state.

    `"early"`, `"middle"`, `"late"` are the thirds `[0, round(L/3))`, `[round(L/3), round(2L/3))`,
    `[round(2L/3), L)`; `"final_hidden"` selects only the final hidden state (the LM head's input); negative indices count from the end.
    """
    spec = parse_layer_spec(spec)
    if spec == "none":
        return [], False
    if spec == "final_hidden":
        return [], True
    if spec == "all":
        return list(range(num_layers)), False
    if isinstance(spec, str):
        bounds = [0, round(num_layers / 3), round(2 * num_layers / 3), num_layers]
        third = ("early", "middle", "late").index(spec)
        indices = list(range(bounds[third], bounds[third + 1]))
        if not indices:
            raise ValueError(f"`perturb_layers={spec!r}` selects no layer of a model with {num_layers} layers.")
        return indices, False
    indices = []
    for index in spec:
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"`perturb_layers` index {index} is out of range for a model with {num_layers} decoder layers "
                f"(allowed: {-num_layers}..{num_layers - 1})."
            )
        indices.append(index % num_layers)
    return sorted(set(indices)), False


def noise_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps), so nearby keys give unrelated noise streams."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def deepspeed_fp32_master(tensor: torch.Tensor) -> torch.Tensor | None:
    """DeepSpeed's whole float32 master copy of a parameter, or None outside DeepSpeed (or before its optimizer exists).

    A collective under ZeRO-1/2/3 (the master copy is partitioned over the ranks): every rank must call it.
    """
    if "deepspeed" not in sys.modules:
        return None
    if not hasattr(tensor, "ds_id") and getattr(tensor, "_hp_mapping", None) is None:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(tensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain, whole tensor from a parameter that FSDP2 (DTensor) or DeepSpeed may have partitioned.

    Under DeepSpeed this is the float32 master copy (the module holds sigma in the model's dtype), and reading it is a
    collective, so every rank must call it (the trainer does, when it logs and saves).
    """
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    master = deepspeed_fp32_master(tensor)
    if master is not None:
        return master
    if hasattr(tensor, "ds_id"):  # a ZeRO-3 partitioned parameter, before DeepSpeed's optimizer exists
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor


class _SeededNoise(torch.autograd.Function):
    """`hidden + sigma * scale * eps` where `eps` is re-drawn from its seed in backward instead of being saved.

    Storing `eps` for sigma's gradient would keep one hidden-state-sized tensor per perturbed layer alive until
    backward (with gradient checkpointing that doubles the saved activations); re-drawing it costs one more `randn`.
    """

    @staticmethod
    def forward(ctx, hidden, sigma, scale, generator, seed):
        eps = _draw(hidden, generator, seed)
        if scale is not None:
            eps = eps * scale
        ctx.generator, ctx.seed = generator, seed
        ctx.save_for_backward(scale)
        ctx.hidden_meta = (hidden.shape, hidden.dtype, hidden.device)
        ctx.sigma_shape = sigma.shape
        return hidden + sigma.to(hidden.dtype) * eps

    @staticmethod
    def backward(ctx, grad_output):
        grad_sigma = None
        if ctx.needs_input_grad[1]:
            (scale,) = ctx.saved_tensors
            eps = _draw(grad_output, ctx.generator, ctx.seed)
            if scale is not None:
                eps = eps * scale
            product = (grad_output * eps).float()
            if len(ctx.sigma_shape) == 0:
                grad_sigma = product.sum()
            else:  # one sigma per channel: sum over every dimension but the last
                grad_sigma = product.reshape(-1, product.size(-1)).sum(0)
        return grad_output, grad_sigma, None, None, None


@torch.no_grad()
def noise_survival(
    hidden: torch.Tensor,
    perturbed: torch.Tensor,
    log_sigma: torch.Tensor,
    scale: torch.Tensor | None = None,
    max_positions: int = 256,
) -> torch.Tensor:
    """
    How much of the intended noise survived the addition in the hidden state's dtype: the RMS of `perturbed - hidden`
    (what was actually added, computed in float32 from the stored values) over the RMS intended, `sigma` times the RMS
    of `scale` (1 for absolute noise; `eps` has unit RMS), on at most `max_positions` evenly spaced token positions.
    1 means the noise arrived whole; in bf16, a perturbation far below the hidden state's rounding step (~0.4% of its
    magnitude) is mostly or entirely rounded away (0). A 0-d float32 tensor.
    """
    size = hidden.size(-1)
    flat_in, flat_out = hidden.detach().reshape(-1, size), perturbed.detach().reshape(-1, size)
    stride = max(1, flat_in.size(0) // max_positions)
    added = flat_out[::stride].float() - flat_in[::stride].float()
    sigma_sq = log_sigma.detach().float().exp().pow(2)
    scale_sq = scale.detach().reshape(-1, 1)[::stride].float().pow(2) if scale is not None else torch.ones(1, 1)
    intended_sq = (sigma_sq * scale_sq.to(sigma_sq.device)).mean()
    return added.pow(2).mean().sqrt() / intended_sq.sqrt().clamp(min=1e-30)


def _draw(like: torch.Tensor, generator: torch.Generator, seed: int) -> torch.Tensor:
    generator.manual_seed(seed)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class LayerwisePerturbation(nn.Module):
    """
    Learnable Gaussian noise on the input hidden state of selected decoder layers.

    Each selected layer `l` (a slot `k` of this module) gets `h <- h + sigma_k * eps` with
    `sigma_k = exp(log_sigma[k])` and `eps ~ N(0, I)` of the hidden state's shape, drawn from a generator seeded by
    (seed, step, micro_step, rank, l). With `noise_scale="rms"`, `eps` is also multiplied by the (detached) RMS of
    each token's hidden state. The final-hidden-state slot (`perturb_layers="final_hidden"`) has layer id `num_layers`.

    Use [`LayerwisePerturbation.attach`] to build and hook it onto a model, [`active`] to switch the noise on, and
    [`detach`] to remove every trace of it.

    Args:
        layer_ids (`list[int]`): the layer id of each slot.
        hidden_size (`int`): hidden size of the model.
        sigma_init (`float`): initial sigma of every slot (>= 0).
        sigma_shape (`str`): `"scalar"` or `"channel"`.
        learnable (`bool`): whether `log_sigma` requires gradients.
        noise_scale (`str`): `"absolute"` or `"rms"`.
        seed (`int`): base seed of the noise.
    """

    def __init__(
        self,
        layer_ids: list[int],
        hidden_size: int,
        sigma_init: float = 0.02,
        sigma_shape: str = "scalar",
        learnable: bool = True,
        noise_scale: str = "absolute",
        seed: int = 0,
    ):
        super().__init__()
        if sigma_shape not in SIGMA_SHAPES:
            raise ValueError(f"`sigma_shape` got {sigma_shape!r}; allowed values are {list(SIGMA_SHAPES)}.")
        if noise_scale not in NOISE_SCALES:
            raise ValueError(f"`noise_scale` got {noise_scale!r}; allowed values are {list(NOISE_SCALES)}.")
        if sigma_init < 0:
            raise ValueError(f"`sigma_init` must be >= 0, got {sigma_init}.")
        if not layer_ids:
            raise ValueError("LayerwisePerturbation needs at least one layer.")
        self.layer_ids = list(layer_ids)
        self.hidden_size = hidden_size
        self.sigma_shape = sigma_shape
        self.noise_scale = noise_scale
        self.seed = int(seed)
        self.rank = 0
        shape = (len(layer_ids),) if sigma_shape == "scalar" else (len(layer_ids), hidden_size)
        log_init = math.log(sigma_init) if sigma_init > 0 else float("-inf")
        self.log_sigma = nn.Parameter(torch.full(shape, log_init, dtype=torch.float32), requires_grad=learnable)
        self._key: tuple[int, int] | None = None  # set inside `active`
        self._backward_key: tuple[int, int] | None = None  # the last active key, for checkpoint recomputation
        self._handles: list = []
        self._host_ref: weakref.ref | None = None  # a weak reference: the host must not become a submodule
        self._generators: dict[torch.device, torch.Generator] = {}  # re-seeded for every draw
        self.num_noise_calls = 0  # how many times noise was added (diagnostics and tests)
        # noise survival per slot (RMS of what was added over the RMS intended), measured in the forward pass on a
        # sample of positions when `track_survival` is on; 0-d tensors, read by the trainer without a sync
        self.track_survival = False
        self._survival: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def for_training(cls, model: nn.Module, args, rank: int = 0) -> "LayerwisePerturbation":
        """The perturbation an `ALPConfig` (`args`) asks for, attached to the policy of the process `rank`, with the
        per-layer noise survival tracked (`alp/noise_survival`: a few ops on 256 positions per layer)."""
        perturbation = cls.attach(
            model,
            layers=args.perturb_layers,
            sigma_init=args.perturb_sigma_init,
            sigma_shape=args.perturb_sigma_shape,
            learnable=args.perturb_sigma_learnable,
            noise_scale=args.perturb_noise_scale,
            seed=args.perturb_seed if args.perturb_seed is not None else args.seed,
        )
        perturbation.rank = rank
        perturbation.track_survival = True
        return perturbation

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        layers: str | list[int] = "all",
        sigma_init: float = 0.02,
        sigma_shape: str = "scalar",
        learnable: bool = True,
        noise_scale: str = "absolute",
        seed: int = 0,
        layers_path: str | None = None,
    ) -> "LayerwisePerturbation":
        """Build a perturbation for `model` (any HF causal LM, PEFT-wrapped or not) and hook it onto its layers."""
        if hasattr(model, MODULE_NAME):
            raise ValueError(f"{type(model).__name__} already has an `{MODULE_NAME}` attached; detach it first.")
        path, decoder_layers = find_decoder_layers(model, layers_path)
        num_layers = len(decoder_layers)
        indices, final = resolve_layer_indices(layers, num_layers)
        hidden_size = _config_int(_text_config(model), "hidden_size", "n_embd", "d_model")
        if hidden_size is None:
            raise ValueError(f"Could not read the hidden size from the config of {type(model).__name__}.")
        layer_ids = indices + ([num_layers] if final else [])
        module = cls(layer_ids, hidden_size, sigma_init, sigma_shape, learnable, noise_scale, seed)
        reference = next(model.parameters(), None)
        if reference is not None:
            module.to(device=reference.device)
        model.add_module(MODULE_NAME, module)
        module._host_ref = weakref.ref(model)
        for slot, index in enumerate(indices):
            hook = decoder_layers[index].register_forward_pre_hook(module._make_pre_hook(slot), with_kwargs=True)
            module._handles.append(hook)
        if final:
            backbone = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            module._handles.append(backbone.register_forward_hook(module._make_output_hook(len(indices))))
        logger.info(
            "ALP perturbation attached to %s (%d layers at `%s`): layers %s",
            type(model).__name__,
            num_layers,
            path,
            layer_ids,
        )
        return module

    def detach(self) -> None:
        """Remove the hooks and the submodule: the host model is left exactly as it was before `attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        host = self.host
        if host is not None and getattr(host, MODULE_NAME, None) is self:
            delattr(host, MODULE_NAME)
        self._host_ref = None

    @property
    def host(self) -> nn.Module | None:
        """The model this perturbation is attached to (None once detached)."""
        return self._host_ref() if self._host_ref is not None else None

    @contextmanager
    def unregistered(self) -> Iterator[None]:
        """Temporarily remove the submodule from its host (hooks stay), e.g. to save the bare model weights."""
        host = self.host
        if host is None or getattr(host, MODULE_NAME, None) is not self:
            yield
            return
        delattr(host, MODULE_NAME)
        try:
            yield
        finally:
            host.add_module(MODULE_NAME, self)

    # ------------------------------------------------------------------------------------------------- noise state
    @contextmanager
    def active(self, step: int, micro_step: int = 0) -> Iterator["LayerwisePerturbation"]:
        """Add noise to every forward pass run inside this context, keyed by (step, micro_step)."""
        previous = self._key
        self._key = self._backward_key = (int(step), int(micro_step))
        try:
            yield self
        finally:
            self._key = previous

    def disarm(self) -> None:
        """Forget the last active key: a later backward recomputation will not add noise any more."""
        self._backward_key = None

    def _current_key(self) -> tuple[int, int] | None:
        if self._key is not None:
            return self._key
        # A gradient-checkpointed layer whose hooks run inside the checkpoint is re-run during backward: reproduce the
        # noise of the forward pass it replays. Outside backward (generation, eval, reference), no noise.
        if self._backward_key is not None and torch._C._current_graph_task_id() != -1:
            return self._backward_key
        return None

    @property
    def sigma(self) -> torch.Tensor:
        """Current sigma of every slot (detached, float32), `(num_slots,)` or `(num_slots, hidden_size)`."""
        return _full(self.log_sigma).detach().float().exp()

    def sigma_per_layer(self, log_sigma: torch.Tensor | None = None) -> dict[int, float]:
        """Mean sigma of each perturbed layer id (the mean over channels for `sigma_shape="channel"`)."""
        sigma = self.sigma if log_sigma is None else log_sigma.detach().float().exp()
        values = sigma if sigma.dim() == 1 else sigma.mean(-1)
        return {layer: float(v) for layer, v in zip(self.layer_ids, values.tolist())}

    def forward(self, hidden_states: torch.Tensor, slot: int) -> torch.Tensor:
        """Return `hidden_states + sigma[slot] * eps` (unchanged outside `active`)."""
        key = self._current_key()
        if key is None:
            return hidden_states
        device = hidden_states.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        seed = noise_seed(self.seed, key[0], key[1], self.rank, self.layer_ids[slot])
        scale = None
        if self.noise_scale == "rms":
            scale = hidden_states.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(hidden_states.dtype)
        self.num_noise_calls += 1
        out = _SeededNoise.apply(hidden_states, self.log_sigma[slot].exp(), scale, self._generators[device], seed)
        if self.track_survival and torch._C._current_graph_task_id() == -1:  # not a checkpoint recomputation
            self._survival[slot] = noise_survival(hidden_states, out, self.log_sigma[slot], scale)
        return out

    def survival_per_layer(self) -> dict[int, torch.Tensor]:
        """The last measured noise survival of each perturbed layer id (0-d tensors; empty before any noise)."""
        return {self.layer_ids[slot]: value for slot, value in sorted(self._survival.items())}

    # ---------------------------------------------------------------------------------------------------- hooking
    def _make_pre_hook(self, slot: int):
        def pre_hook(layer, args, kwargs):
            if self._current_key() is None:
                return None
            if args:
                return (self(args[0], slot), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": self(kwargs["hidden_states"], slot)}
            raise RuntimeError(f"Could not find the hidden states in the inputs of {type(layer).__name__}.")

        return pre_hook

    def _make_output_hook(self, slot: int):
        def output_hook(backbone, args, output):
            if self._current_key() is None:
                return None
            if isinstance(output, tuple):
                return (self(output[0], slot), *output[1:])
            output["last_hidden_state"] = self(output["last_hidden_state"], slot)
            return output

        return output_hook

    # ------------------------------------------------------------------------------------------------ persistence
    def describe(self, log_sigma: torch.Tensor | None = None) -> dict:
        """JSON-serialisable description: settings and current sigma per layer."""
        return {
            "layer_ids": self.layer_ids,
            "hidden_size": self.hidden_size,
            "sigma_shape": self.sigma_shape,
            "noise_scale": self.noise_scale,
            "learnable": self.log_sigma.requires_grad,
            "seed": self.seed,
            "sigma_per_layer": {str(k): v for k, v in self.sigma_per_layer(log_sigma).items()},
        }

    def save(self, directory: str, log_sigma: torch.Tensor | None = None) -> None:
        """Write `alp_perturbation.safetensors` (log_sigma) and `alp_perturbation.json` into `directory`.

        `log_sigma` (e.g. taken from a state dict DeepSpeed / FSDP gathered on every rank) is written instead of the
        parameter, so that the single saving rank never has to gather a partitioned parameter alone.
        """
        os.makedirs(directory, exist_ok=True)
        log_sigma = (_full(self.log_sigma) if log_sigma is None else log_sigma).detach().float().cpu().contiguous()
        save_file({"log_sigma": log_sigma}, os.path.join(directory, SIDE_FILE))
        with open(os.path.join(directory, SIDE_CONFIG_FILE), "w") as f:
            json.dump(self.describe(log_sigma), f, indent=2)

    def load(self, directory: str) -> bool:
        """Load `log_sigma` from a directory written by [`save`]; returns False if there is no side file."""
        path = os.path.join(directory, SIDE_FILE)
        if not os.path.exists(path):
            return False
        log_sigma = load_file(path)["log_sigma"]
        if log_sigma.shape != self.log_sigma.shape:
            raise ValueError(
                f"{path} holds log_sigma of shape {tuple(log_sigma.shape)}, expected "
                f"{tuple(self.log_sigma.shape)} (different perturb_layers / perturb_sigma_shape?)."
            )
        with torch.no_grad():
            self.log_sigma.copy_(log_sigma.to(self.log_sigma.device, self.log_sigma.dtype))
        return True


__all__ = [
    "LAYER_SPECS",
    "MODULE_NAME",
    "SIDE_FILE",
    "LayerwisePerturbation",
    "find_decoder_layers",
    "noise_seed",
    "noise_survival",
    "resolve_layer_indices",
]
