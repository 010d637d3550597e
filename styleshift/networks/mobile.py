"""A light ResNet generator for CPUs: depthwise-separable residual blocks.

GAN Compression (Li et al. 2020) replaces each 3x3 convolution of the CycleGAN trunk by a depthwise 3x3
plus a pointwise 1x1, cutting the trunk's multiply-adds by about 8x at 256 channels with little loss.
"""

from __future__ import annotations

from torch import nn

from .layers import init_weights, instance_norm
from .resnet import decoder, encoder


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


class MobileResnetGenerator(nn.Module):
    size_multiple = 4

    def __init__(self, in_channels=3, out_channels=3, ngf=32, n_blocks=6, upsample="resize", downsample="blur"):
        super().__init__()
        trunk = [MobileResnetBlock(ngf * 4) for _ in range(n_blocks)]
        self.model = nn.Sequential(*encoder(in_channels, ngf, downsample), *trunk, *decoder(out_channels, ngf, upsample))
        init_weights(self)

    def forward(self, x):
        return self.model(x)
