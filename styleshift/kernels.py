"""Faster CPU kernels for the convolutions that dominate a ResNet generator.

The nine residual blocks of the reference generator are 3x3, stride-1, 256-channel convolutions: about
80% of its multiply-adds. On CPUs without bf16 matrix units, fp32 oneDNN already runs near the
arithmetic limit, so the remaining lever is doing fewer multiplications: Winograd's minimal filtering
algorithm F(m x m, 3 x 3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks")
computes an m x m output tile with (m+2)^2 instead of 9 m^2 multiplications. PyTorch ships NNPACK, which
implements it for exactly this case; on our 2-core Xeon it ran such a convolution about 1.4x faster than
oneDNN.

`accelerate(net)` switches every eligible convolution of a network to it, for training and inference:

- forward: NNPACK;
- gradient w.r.t. the input: a convolution too (the "full" correlation of the output gradient with the
  kernel flipped in space and with its channel axes swapped), so it also runs on NNPACK;
- gradient w.r.t. the weight and bias: oneDNN, as before (NNPACK has no fast path for it).

Eligible means: a plain nn.Conv2d, 3x3, stride 1, no dilation, no groups, no padding of its own (the
generators pad by reflection before it). The parameters, their names and the state dict are unchanged;
on other devices, dtypes or under autocast the layer falls back to the ordinary convolution.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def available() -> bool:
    # is_available() also initialises NNPACK; calling its convolution before it fails.
    return bool(torch.backends.nnpack.is_available())


def _nnpack(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if b is None:
        b = w.new_zeros(w.shape[0])
    return torch._nnpack_spatial_convolution(x.contiguous(), w.contiguous(), b, [0, 0])


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _nnpack(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        g = g.contiguous()
        if ctx.needs_input_grad[0]:
            k = w.shape[-1] - 1
            # dL/dx = g (zero-padded by k-1 each side) correlated with w flipped and transposed.
            gx = _nnpack(F.pad(g, (k, k, k, k)), w.flip(2, 3).transpose(0, 1), None)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w, [w.shape[0]] if ctx.has_bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        return gx, gw, gb


# Below this many input pixels NNPACK's tile transforms cost more than they save: for the ResNet-9 trunk
# (256 channels) a training step at 34x34 took 1.14x the oneDNN time, at 66x66 0.85x.
MIN_PIXELS = 48 * 48


class WinogradConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters) whose CPU fp32 computation uses NNPACK's Winograd convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and x.dim() == 4
                and x.shape[-1] * x.shape[-2] >= MIN_PIXELS):
            return _WinogradConv.apply(x, self.weight, self.bias)
        return super().forward(x)


def eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding == (0, 0) and m.padding_mode == "zeros")


def accelerate(net: nn.Module) -> int:
    """Switch `net`'s eligible convolutions to Winograd in place (when NNPACK is there); returns how many."""
    if not available():
        return 0
    n = 0
    for m in net.modules():
        if eligible(m):
            m.__class__ = WinogradConv2d  # same attributes and parameters; only forward differs
            n += 1
    return n
