"""Which scaled-dot-product-attention (SDPA) kernels the policy-update step may use.

PyTorch >= 2.11 picks its cuDNN SDPA backend by default on Hopper GPUs (H100/H200, compute capability 9.x), and that
backend's backward kernel returns NaN in `grad_q` when an explicit attention mask is passed, the sequence length is
64 modulo 128, and some query row's log-sum-exp is below ln(FLT_MAX) ~ -88.7 (pytorch/pytorch#196678; the DPO/KTO
report huggingface/trl#7181). The padded half of the last 128-wide key tile is scored 0 instead of -inf, so
`exp(0 - lse)` overflows and `inf * 0` gives NaN. GRPO batches meet all three conditions: transformers passes an
explicit mask for left-padded prompts and right-padded completions, the padded sequence length changes every step
(so it is 64 mod 128 sooner or later), and the query rows of left padding are fully masked, so their log-sum-exp is
-inf. The forward pass is correct; only the gradient is poisoned, and the optimizer then writes NaN into the weights.

The narrowest fix is to keep cuDNN out of the policy-update step (forward, backward and any gradient-checkpoint
recomputation) on the affected setups, letting PyTorch fall back to its memory-efficient / flash / math kernels,
which handle these masks; generation and the no-grad log-prob passes keep PyTorch's own choice. Nothing changes on
CPUs, on other GPU generations, on older torch, or with `attn_implementation` other than `sdpa`.
"""

from contextlib import contextmanager, nullcontext

import torch
from packaging import version


CUDNN_SDPA_SETTINGS = ("auto", "on", "off")
CUDNN_SDPA_BUG = "pytorch/pytorch#196678"
# First torch release whose default backend priority puts cuDNN SDPA in front on Hopper with the faulty kernel.
FIRST_AFFECTED_TORCH = (2, 11)
# First torch release known to ship a fixed kernel; None while no fixed release is known (checked 2026-11: the
# report is closed upstream, but no release notes name the fix). Set it when one is, so that "auto" stops applying.
FIRST_FIXED_TORCH: tuple[int, int] | None = None
AFFECTED_COMPUTE_CAPABILITY_MAJOR = 9  # sm90: the kernel named in the report is sm90-only


def cudnn_sdpa_backward_is_affected(torch_version: str, compute_capability: tuple[int, int] | None) -> bool:
    """Whether cuDNN's SDPA backward with the bug above is what this torch build picks on this device.

    `compute_capability` is `None` off CUDA (CPU, MPS, XPU: no cuDNN attention at all).
    """
    if compute_capability is None or compute_capability[0] != AFFECTED_COMPUTE_CAPABILITY_MAJOR:
        return False
    release = version.parse(torch_version).release[:2]
    if release < FIRST_AFFECTED_TORCH:
        return False
    return FIRST_FIXED_TORCH is None or release < FIRST_FIXED_TORCH


def resolve_cudnn_sdpa(
    setting: str,
    attn_implementation: str | None,
    torch_version: str,
    compute_capability: tuple[int, int] | None,
) -> tuple[bool, str]:
    """Decide whether the policy-update step keeps cuDNN SDPA out, and say why (one line, for the log).

    Args:
        setting: `ALPConfig.cudnn_sdpa_backward`: `"auto"` (off only where the bug applies), `"off"` (always keep
            cuDNN SDPA out of the update), `"on"` (leave PyTorch's choice alone).
        attn_implementation: the model's `config._attn_implementation` (`"sdpa"`, `"eager"`, ...).
        torch_version: `torch.__version__`.
        compute_capability: `torch.cuda.get_device_capability()` of the training device, `None` off CUDA.

    Returns:
        `(exclude_cudnn, reason)`.
    """
    if setting not in CUDNN_SDPA_SETTINGS:
        raise ValueError(f"`cudnn_sdpa_backward` got {setting!r}; allowed values are {list(CUDNN_SDPA_SETTINGS)}.")
    if setting == "on":
        return False, "cudnn_sdpa_backward='on': PyTorch's own SDPA backend choice in the policy update."
    if setting == "off":
        return True, "cudnn_sdpa_backward='off': the policy update never uses PyTorch's cuDNN SDPA backend."
    if attn_implementation != "sdpa":
        return False, f"attn_implementation={attn_implementation!r} does not use SDPA: nothing to change."
    if not cudnn_sdpa_backward_is_affected(torch_version, compute_capability):
        return False, "this torch/device is not affected by the cuDNN SDPA backward NaN: nothing to change."
    return True, (
        f"torch {torch_version} on a compute-capability {compute_capability[0]}.{compute_capability[1]} GPU picks "
        f"cuDNN's SDPA kernel, whose backward returns NaN gradients for padded GRPO batches ({CUDNN_SDPA_BUG}): "
        "the policy-update step uses PyTorch's other SDPA kernels instead (generation is unchanged). Set "
        "cudnn_sdpa_backward='on' to keep cuDNN."
    )


def enabled_sdpa_backends() -> list:
    """The SDPA backends the global flags currently allow (in `torch.nn.attention.SDPBackend` terms)."""
    from torch.nn.attention import SDPBackend

    flags = {
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled(),
    }
    return [backend for backend, enabled in flags.items() if enabled]


def sdpa_backends_without_cudnn(exclude: bool):
    """Context in which SDPA may use every backend enabled now except cuDNN (a no-op when `exclude` is False).

    The user's own choices (a backend they disabled) are kept; on exit every flag is restored.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    others = [b for b in enabled_sdpa_backends() if b != SDPBackend.CUDNN_ATTENTION]
    if not exclude or not others:  # nothing to exclude, or cuDNN is all the user left enabled: keep their choice
        return nullcontext()
    return sdpa_kernel(others)


@contextmanager
def sdpa_backends_restored(backends: list | None):
    """Context that puts the SDPA backend flags back to `backends` (as read by `enabled_sdpa_backends()`), e.g. for
    generation inside a step that excludes cuDNN; `None` is a no-op."""
    if backends is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends):
        yield


def update_excludes_cudnn_sdpa(setting: str, model, device) -> tuple[bool, str]:
    """`resolve_cudnn_sdpa` for a model on a device: whether the policy-update step keeps cuDNN SDPA out, and why."""
    attn_implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return resolve_cudnn_sdpa(setting, attn_implementation, torch.__version__, capability)
