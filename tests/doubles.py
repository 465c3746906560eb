"""Test doubles shared by the tests and the launched test workers (never part of the installed package)."""

import torch


class NaNBackward(torch.autograd.Function):
    """Identity forward, NaN backward: what cuDNN's faulty SDPA backward does (a finite loss, NaN gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_loss(loss: torch.Tensor, kind: str | None) -> torch.Tensor:
    """`"value"`: the loss value becomes NaN, its gradients stay finite; `"grad"`: the value stays finite, every
    gradient becomes NaN; `None`: unchanged."""
    if kind == "value":
        return loss + (float("nan") - loss.detach())
    if kind == "grad":
        return NaNBackward.apply(loss)
    return loss
