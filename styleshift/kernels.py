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

`fold_narrow(net)` is for inference in channels-last layout (bf16 on a CPU): a convolution with few output
channels, the generator's last 7x7 one (64 -> 3), leaves oneDNN's vector lanes mostly idle and ran at a sixth
of the trunk's rate. Seen as a map of half the width with each pair of columns as one pixel (a free view of a
channels-last map), it is a convolution with twice the channels in and out and a 7 x 4 kernel: 1.14x the
multiply-adds, but 1.7x faster (8.3 -> 4.9 ms for a 278 x 278 tile in bf16). ResNet-9 at 1536 x 2048: the
decoder's last pass took 0.52 s instead of 0.67 (medians of 4, alternating in one process). The same view of
the first convolution (3 -> 64 channels) gained nothing measurable, so only narrow outputs are folded.
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


class FoldedConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters) computed, in inference on channels-last CPU maps of even width, over pairs
    of columns (see the module docstring): output column 2b + q is channel q * O + o of a convolution whose
    input channel s * C + c is input column 2b + s. The folded weight is made from the weight at every call
    (about 0.1 ms for 64 -> 3 channels, 7 x 7), so it can never be stale."""

    fold = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.fold
        if (torch.is_grad_enabled() or x.device.type != "cpu" or not _narrow_shape(self) or x.dim() != 4
                or x.dtype != self.weight.dtype or x.shape[-1] % k or x.shape[-1] < self.kernel_size[1]
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)  # (measured and checked on CPUs only; the layer's settings may have changed)
        n, c, h, w = x.shape
        weight, bias = _fold_weight(self.weight, self.bias, k)
        xf = x.permute(0, 2, 3, 1).reshape(n, h, w // k, k * c).permute(0, 3, 1, 2)  # a view: no copy
        y = F.conv2d(xf, weight, bias)
        o = self.out_channels
        # (n, k*O, h', b) back to (n, O, h', k*b): a view where oneDNN wrote channels-last (it does for a
        # channels-last input), else reshape copies. For an odd kernel width, k*b is exactly the plain output's.
        return y.permute(0, 2, 3, 1).reshape(n, y.shape[-2], -1, o).permute(0, 3, 1, 2)


def _fold_weight(w: torch.Tensor, b: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """O x C x Kh x Kw -> (k O) x (k C) x Kh x V, V = ceil((Kw + k - 1) / k): output q*O+o, input s*C+c, tap
    (i, v) holds w[o, c, i, j] for the j with q + j = k v + s, zero for none. Values are only moved: exact in
    any dtype."""
    o, c, kh, kw = w.shape
    v_taps = -(-(kw + k - 1) // k)
    folded = w.new_zeros(k, o, kh, v_taps, k, c)  # (q, o), rows, v, (s, c)
    for q in range(k):
        for j in range(kw):
            v, s = divmod(q + j, k)
            folded[q, :, :, v, s, :] = w[:, :, :, j].permute(0, 2, 1)
    folded = folded.permute(0, 1, 4, 5, 2, 3).reshape(k * o, k * c, kh, v_taps)
    return folded.contiguous(memory_format=torch.channels_last), None if b is None else b.repeat(k)


def narrow(m: nn.Module) -> bool:
    """A convolution with at most 4 output channels, stride 1, no padding of its own and an odd kernel width
    above 1 (see fold_narrow)."""
    return type(m) is nn.Conv2d and _narrow_shape(m)


def _narrow_shape(m: nn.Conv2d) -> bool:
    return (m.out_channels <= 4 and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
            and m.padding == (0, 0) and m.kernel_size[1] % 2 == 1 and m.kernel_size[1] > 1)


def fold_narrow(net: nn.Module) -> int:
    """Switch `net`'s narrow convolutions to FoldedConv2d in place; returns how many. For inference on
    channels-last maps; anything else runs as before."""
    n = 0
    for m in net.modules():
        if narrow(m):
            m.__class__ = FoldedConv2d
            n += 1
    return n
