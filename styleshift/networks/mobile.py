"""A light ResNet generator for CPUs: depthwise-separable residual blocks.

GAN Compression (Li et al. 2020) replaces each 3x3 convolution of the CycleGAN trunk by a depthwise 3x3
plus a pointwise 1x1, cutting the trunk's multiply-adds by about 8x at 256 channels with little loss.
"""

from __future__ import annotations

from torch import nn

from .layers import instance_norm


def separable_conv(channels: int) -> list[nn.Module]:
    return [
        nn.ReflectionPad2d(1),
        nn.Conv2d(channels, channels, 3, groups=channels, bias=True),  # depthwise: spatial mixing
        nn.Conv2d(channels, channels, 1, bias=True),  # pointwise: channel mixing
    ]


class MobileResnetBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *separable_conv(channels),
            instance_norm(channels),
            nn.ReLU(True),
            *separable_conv(channels),
            instance_norm(channels),
        )

    def forward(self, x):
        return x + self.block(x)
