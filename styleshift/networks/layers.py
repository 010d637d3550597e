"""Building blocks shared by the generators and discriminators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InstanceNorm2d(nn.InstanceNorm2d):
    """Instance normalisation (Ulyanov et al. 2016), the reference CycleGAN's choice: per-image, per-channel
    statistics, no affine parameters, no running statistics.

    Same function and state as nn.InstanceNorm2d, computed by faster kernels on CPUs: group norm with one
    channel per group (about 4x faster than F.instance_norm forward + backward), and for channels-last
    tensors a batch norm over the (H*W, C) view, which needs no layout copy.

    Under mixed precision the statistics are always taken in fp32. When training on a CPU the output stays
    fp32 too, so the padding, ReLU and residual additions that follow run in fp32 and only the convolutions
    (which autocast casts) use the bf16 matrix units: those memory-bound ops have no fast bf16 backward
    kernels on CPUs, which made a naive bf16 training step slower than fp32. A network converted to bf16 and
    run without gradients or autocast (styleshift.stylizer's CPU inference) keeps its dtype: the group and
    batch norm kernels accumulate in fp32 either way, and it then runs with no casts at all.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps, affine=False, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return F.instance_norm(x, eps=self.eps)  # exports as ONNX InstanceNormalization
        if x.dtype in (torch.float16, torch.bfloat16) and (torch.is_grad_enabled()
                                                           or torch.is_autocast_enabled(x.device.type)):
            with torch.autocast(x.device.type, enabled=False):
                y = self._normalise(x.float())
            return y if x.device.type == "cpu" else y.to(x.dtype)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if n > 0 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            parts = [
                F.batch_norm(x[i].permute(1, 2, 0).reshape(h * w, c), None, None, training=True, eps=self.eps)
                .reshape(1, h, w, c).permute(0, 3, 1, 2)
                for i in range(n)
            ]
            return parts[0] if n == 1 else torch.cat(parts)
        return F.group_norm(x, c, eps=self.eps)


def instance_norm(channels: int) -> nn.Module:
    return InstanceNorm2d(channels)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """normal(0, 0.02) weights and zero biases, as the reference CycleGAN initialises every network."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in net.modules():
        if hasattr(m, "reset_icnr"):
            m.reset_icnr()
    return net


class Blur(nn.Module):
    """Low-pass with the binomial [1, 2, 1] x [1, 2, 1] / 16 filter, reflecting at the border.

    Followed by subsampling it downsamples without aliasing (Zhang 2019, "Making Convolutional Networks
    Shift-Invariant Again"): a strided convolution alone folds high frequencies into the feature map, which
    generators turn into texture artifacts.
    """

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16.0)[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kornia.filters import filter2d

        return filter2d(x, self.kernel.to(x.dtype), border_type="reflect")


class Subsample(nn.Module):
    """Keep every second pixel (after a Blur: a BlurPool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ::2, ::2]


class ResizeUpsample(nn.Module):
    """Double the size by nearest-neighbour resizing; the convolution after it learns the detail.

    Unlike a stride-2 transposed convolution, every output pixel is made by the same kernel from the same
    number of inputs, so no checkerboard pattern can form; nearest-neighbour resizing worked best in
    Odena et al. 2016 ("Deconvolution and Checkerboard Artifacts").
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")


class SubpixelUpsample(nn.Module):
    """Double the size by a convolution to 4x the channels and a pixel shuffle (Shi et al. 2016).

    Like a transposed convolution it has its own kernel for each of the four output phases, so it can draw
    detail at the output resolution; its "ICNR" start (Aitken et al. 2017) gives the four phases the same
    kernel, i.e. it begins as a nearest-neighbour resize-convolution, free of checkerboard artifacts.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(c_in, c_out * 4, 3, bias=True)
        self.shuffle = nn.PixelShuffle(2)

    def reset_icnr(self) -> None:
        with torch.no_grad():
            w, b = self.conv.weight, self.conv.bias
            w.copy_(w[::4].repeat_interleave(4, dim=0))
            b.copy_(b[::4].repeat_interleave(4, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(self.pad(x)))
