"""Causal depthwise convolution over time, in the [batch, T, channels] layout the memory works in.

`causal_depthwise_conv(context, weight, bias)` gives, for every channel c and step t,

    y[:, t, c] = bias[c] + sum_j weight[c, j] * context[:, t + j, c],   j < K,

where `context` holds the K - 1 steps before the window followed by its T steps: the same as
`nn.Conv1d(C, C, K, groups=C)` on `context.transpose(1, 2)`. Written as K shifted multiply-adds
with a hand-written backward, it needs no transposes to and from channels-first (each one a
full copy of the activations) and avoids the depthwise-conv backward of oneDNN, which was a
tenth of the memory's training step. `conv1d_reference` is the plain torch form, for tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def conv1d_reference(context: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The same result through `F.conv1d`: context [B, T + K - 1, C], weight [C, 1, K] or [C, K]."""
    channels = context.shape[-1]
    return F.conv1d(context.transpose(1, 2), weight.reshape(channels, 1, -1), bias, groups=channels).transpose(1, 2)


class _CausalDepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, context: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        kernel = weight.shape[-1]
        length = context.shape[1] - kernel + 1
        w = weight.to(context.dtype)  # as F.conv1d under autocast: compute in the activations' dtype
        out = context[:, :length] * w[:, 0]
        for j in range(1, kernel):
            out.addcmul_(context[:, j : j + length], w[:, j])
        if bias is not None:
            out += bias.to(context.dtype)
        ctx.save_for_backward(context, w)
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        context, w = ctx.saved_tensors
        kernel = w.shape[-1]
        length = grad_out.shape[1]
        grad_out = grad_out.to(context.dtype)
        grad_context = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_context = context.new_zeros(context.shape)
            for j in range(kernel):
                grad_context[:, j : j + length].addcmul_(grad_out, w[:, j])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.stack(
                [(grad_out * context[:, j : j + length]).sum((0, 1)) for j in range(kernel)], dim=-1
            ).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 1)).to(ctx.weight_dtype)
        return grad_context, grad_weight, grad_bias


def causal_depthwise_conv(context: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """context [B, T + K - 1, C] (K - 1 steps of left context, then the window), weight [C, K]
    (or a Conv1d's [C, 1, K]), bias [C] or None -> [B, T, C]."""
    weight = weight.reshape(weight.shape[0], -1)
    if context.dim() != 3 or context.shape[-1] != weight.shape[0] or context.shape[1] < weight.shape[1] - 1:
        raise ValueError(
            f"context must be [batch, T + {weight.shape[1] - 1}, {weight.shape[0]}] "
            f"got {tuple(context.shape)}"
        )
    return _CausalDepthwiseConv.apply(context, weight, bias)
