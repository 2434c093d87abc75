"""LoRA dropout fused into the adapter's first matrix: the same dropout, a fraction of the memory.

peft computes a LoRA branch as lora_B(lora_A(dropout(x))) * scaling, with `nn.Dropout` in
front of every adapted layer. On the CPU, torch's dropout draws a float noise tensor the size
of x and multiplies x by it; autograd then keeps both, the noise for dropout's backward and the
dropped copy for lora_A's weight gradient: two float copies of each layer's input per adapted
module, with q, k and v each keeping their own copies of the same input. On the quickstart model
that was about 22 MB of the 57 MB of tensors live at a step's peak, and drawing float noise was
a quarter of a step (bench/train_throughput.py, recipe-dropout; BENCHMARKS.md).

`DroppedLinear` does the same computation in one autograd node that keeps only the input (shared
with whatever else keeps it) and a one-byte mask; the backward recomputes the dropped input from
them. The 1/(1-p) rescaling is applied to lora_A's r-wide output instead of its input: the same
value up to rounding. Same distribution of masks, same expected value, same gradients for a
given mask (tests/training/model/test_lora_dropout.py).

Only plain LoRA layers are changed (DoRA and other variants read the dropout module themselves);
the adapter's parameters, names and saved files are unchanged, and evaluation mode is a plain
linear layer, as nn.Dropout is the identity there.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional as F

# The rate is drawn in steps of 1/65536 (16 random bits per element): torch's CPU bernoulli_ draws
# 32 bits per element through its generator one at a time, which made the float noise a quarter of a
# quickstart step; 64-bit words split into four 16-bit draws cost a quarter of that.
_STEPS = 1 << 16


def effective_rate(p: float) -> float:
    """The dropout rate `keep_mask` draws for a requested rate p: p rounded to a multiple of 1/65536."""
    return round(p * _STEPS) / _STEPS


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Which elements of `x` survive dropout at rate p (`effective_rate(p)`): one byte each."""
    words = torch.randint(
        -(1 << 63), (1 << 63) - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device
    )
    draws = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over [-32768, 32767]
    return draws >= round(p * _STEPS) - _STEPS // 2


class _DropoutThenLinear(torch.autograd.Function):
    """(dropout(x) with rate p) @ weight.T, keeping x and the mask instead of the dropped copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x, p)
        ctx.save_for_backward(x, keep, weight)
        ctx.scale = 1.0 / (1.0 - effective_rate(p))
        return F.linear(torch.where(keep, x, 0), weight).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, keep, weight = ctx.saved_tensors
        grad = grad_out * ctx.scale  # r wide: cheaper here than on the input side
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, grad @ weight, 0)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x, 0)
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])
        return grad_x, grad_weight, None


class DroppedLinear(nn.Linear):
    """A LoRA A matrix with the adapter's dropout in front (set by `fuse_lora_dropout`)."""

    dropout_p: float = 0.0

    @classmethod
    def take_over(cls, linear: nn.Linear, p: float) -> DroppedLinear:
        """`linear` itself with a dropout of rate p in front: same parameters, same names."""
        linear.__class__ = cls
        linear.dropout_p = p
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return F.linear(x, self.weight)
        return _DropoutThenLinear.apply(x, self.weight, self.dropout_p)


def fuse_lora_dropout(model: nn.Module) -> int:
    """Move every plain LoRA layer's dropout into its lora_A; returns how many were fused."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        variants = getattr(module, "lora_variant", {})
        for adapter, dropout in list(module.lora_dropout.items()):
            lora_a = getattr(module.lora_A, adapter, None)  # a ModuleDict keeps its modules as attributes
            if (
                type(dropout) is not nn.Dropout
                or not 0.0 < dropout.p < 1.0  # rate 1 drops everything: nothing to rescale
                or adapter in variants
                or type(lora_a) is not nn.Linear
                or lora_a.bias is not None
            ):
                continue
            DroppedLinear.take_over(lora_a, dropout.p)
            module.lora_dropout[adapter] = nn.Identity()
            fused += 1
    return fused
