"""cuDNN SDPA is kept out of the policy-update step exactly where its backward returns NaN (pytorch/pytorch#196678):
the decision per torch version / device / attention implementation / setting, and what the trainer does with it."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from alp_trl import ALPConfig
from alp_trl import attention_backend as ab

from .helpers import build_trainer


H100, A100, B200 = (9, 0), (8, 0), (10, 0)


@pytest.mark.parametrize(
    ("torch_version", "capability", "affected"),
    [
        ("2.13.0", H100, True),
        ("2.11.0+cu130", H100, True),  # the lent GPU's build
        ("2.12.1", (9, 0), True),
        ("2.10.0+cu128", H100, False),  # before the regression
        ("2.9.1", H100, False),
        ("2.13.0", A100, False),  # the faulty kernel is sm90-only
        ("2.13.0", B200, False),
        ("2.13.0", None, False),  # CPU: no cuDNN attention
        ("2.14.0.dev20261101", H100, True),  # no fixed release known yet
    ],
)
def test_affected_setups(torch_version, capability, affected):
    assert ab.cudnn_sdpa_backward_is_affected(torch_version, capability) is affected


def test_a_known_fixed_release_ends_the_workaround(monkeypatch):
    monkeypatch.setattr(ab, "FIRST_FIXED_TORCH", (2, 14))
    assert ab.cudnn_sdpa_backward_is_affected("2.13.0", H100)
    assert not ab.cudnn_sdpa_backward_is_affected("2.14.0", H100)


@pytest.mark.parametrize(
    ("setting", "attn", "torch_version", "capability", "exclude"),
    [
        ("auto", "sdpa", "2.11.0+cu130", H100, True),
        ("auto", "eager", "2.11.0+cu130", H100, False),  # no SDPA at all
        ("auto", "flash_attention_2", "2.13.0", H100, False),
        ("auto", "sdpa", "2.13.0", A100, False),
        ("auto", "sdpa", "2.13.0", None, False),
        ("on", "sdpa", "2.13.0", H100, False),  # the user keeps cuDNN on purpose
        ("off", "sdpa", "2.13.0", None, True),  # the user excludes it everywhere
        ("off", "eager", "2.9.0", A100, True),
    ],
)
def test_resolve(setting, attn, torch_version, capability, exclude):
    decided, reason = ab.resolve_cudnn_sdpa(setting, attn, torch_version, capability)
    assert decided is exclude and reason
    if exclude and setting == "auto":
        assert "pytorch/pytorch#196678" in reason and "cudnn_sdpa_backward='on'" in reason


def test_context_excludes_only_cudnn_and_restores_every_flag():
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):  # flash off
        before = ab.enabled_sdpa_backends()
        with ab.sdpa_backends_without_cudnn(True):
            inside = ab.enabled_sdpa_backends()
            with ab.sdpa_backends_restored(before):  # generation inside the update step
                assert ab.enabled_sdpa_backends() == before
            assert ab.enabled_sdpa_backends() == inside
        assert ab.enabled_sdpa_backends() == before
        with ab.sdpa_backends_without_cudnn(False):
            assert ab.enabled_sdpa_backends() == before
    assert set(before) == {SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION}
    assert set(inside) == {SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION}, "the user's flash choice is kept"


class _BackendSpy:
    """Records `cudnn_sdp_enabled()` in the model's forward passes (with / without grad) and in its backward."""

    def __init__(self, model):
        self.forward_grad, self.forward_no_grad, self.backward = set(), set(), set()
        layer = model.model.layers[0]
        layer.register_forward_hook(self._forward)
        layer.register_full_backward_hook(lambda *args: self.backward.add(torch.backends.cuda.cudnn_sdp_enabled()))

    def _forward(self, module, inputs, output):
        target = self.forward_grad if torch.is_grad_enabled() else self.forward_no_grad
        target.add(torch.backends.cuda.cudnn_sdp_enabled())


@pytest.mark.parametrize(("setting", "in_update"), [("off", False), ("auto", True), ("on", True)])
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_excludes_cudnn_in_the_update_step_only(
    make_model, tokenizer, prompt_dataset, train_args, setting, in_update, gradient_checkpointing
):
    """With the exclusion on ('off'; 'auto' on an affected GPU), the update's forward, backward and checkpoint
    recomputation run without cuDNN SDPA, generation and the no-grad passes with PyTorch's flags; 'auto' on this CPU
    (not affected) and 'on' change nothing. The flags are restored after training."""
    model = make_model()
    spy = _BackendSpy(model)
    args = ALPConfig(
        **train_args,
        cudnn_sdpa_backward=setting,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = build_trainer(model, tokenizer, prompt_dataset, args)
    assert trainer._exclude_cudnn_sdpa is (not in_update)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    trainer.train()
    assert spy.forward_grad == {in_update} and spy.backward == {in_update}
    assert spy.forward_no_grad == {True}, "generation and the no-grad log-prob passes keep PyTorch's choice"
    assert torch.backends.cuda.cudnn_sdp_enabled()
