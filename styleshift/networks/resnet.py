"""ResNet generator of the reference CycleGAN (Johnson et al. 2016 architecture, as used by Zhu et al. 2017)."""

from __future__ import annotations

from torch import nn

from .layers import Blur, ResizeUpsample, SubpixelUpsample, Subsample, init_weights, instance_norm
from .mobile import MobileResnetBlock


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, norm, ReLU, pad, conv3x3, norm](x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=True),
            instance_norm(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=True),
            instance_norm(channels),
        )

    def forward(self, x):
        return x + self.block(x)


def down_layer(c_in: int, c_out: int, downsample: str) -> list[nn.Module]:
    """A stride-2 step to c_out channels, norm and ReLU included."""
    if downsample in ("stride", "stride_reflect"):
        # A 3x3 stride-2 convolution on an even side only ever reads the padding at the top and left (output
        # row o reads rows 2o-1..2o+1), so the reference's zero padding darkens those two edges alone: a band
        # along them. "stride_reflect" pads by reflection there, as every other layer does; same weights.
        mode = "reflect" if downsample == "stride_reflect" else "zeros"
        return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, padding_mode=mode, bias=True), instance_norm(c_out),
                nn.ReLU(True)]
    if downsample == "blur":
        # Zhang 2019's anti-aliased placement: the convolution and ReLU at full resolution, then low-pass
        # and subsample ("BlurPool"), so no frequency the output grid cannot hold is aliased into it.
        return [nn.ReflectionPad2d(1), nn.Conv2d(c_in, c_out, 3, bias=True), instance_norm(c_out), nn.ReLU(True),
                Blur(), Subsample()]
    raise ValueError(f"unknown downsample {downsample!r} (stride, stride_reflect, blur)")


def up_layer(c_in: int, c_out: int, upsample: str) -> list[nn.Module]:
    if upsample == "transpose":
        return [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=True)]
    if upsample == "resize":
        return [ResizeUpsample(), nn.ReflectionPad2d(1), nn.Conv2d(c_in, c_out, 3, bias=True)]
    if upsample == "subpixel":
        return [SubpixelUpsample(c_in, c_out)]
    raise ValueError(f"unknown upsample {upsample!r} (transpose, resize, subpixel)")


def encoder(in_channels: int, ngf: int, downsample: str) -> list[nn.Module]:
    """c7s1-ngf, then two stride-2 steps: d(2ngf), d(4ngf)."""
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=True), instance_norm(ngf), nn.ReLU(True)]
    for mult in (1, 2):
        layers += down_layer(ngf * mult, ngf * mult * 2, downsample)
    return layers


def decoder(out_channels: int, ngf: int, upsample: str) -> list[nn.Module]:
    """u(2ngf), u(ngf), then c7s1-3 and tanh to [-1, 1]."""
    layers: list[nn.Module] = []
    for mult in (4, 2):
        layers += up_layer(ngf * mult, ngf * mult // 2, upsample)
        layers += [instance_norm(ngf * mult // 2), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
    return layers


BLOCKS = {"resnet": ResnetBlock, "mobile": MobileResnetBlock}


class ResnetGenerator(nn.Module):
    """The reference's ResNet generator (Johnson et al. 2016, as used by CycleGAN): encoder, a trunk of
    residual blocks at 1/4 resolution, decoder. `block="mobile"` swaps in GAN Compression's separable blocks."""

    size_multiple = 4  # two stride-2 steps: inputs are padded to a multiple of this

    def __init__(self, in_channels=3, out_channels=3, ngf=64, n_blocks=9, upsample="transpose", downsample="stride",
                 block="resnet"):
        super().__init__()
        trunk = [BLOCKS[block](ngf * 4) for _ in range(n_blocks)]
        self.model = nn.Sequential(*encoder(in_channels, ngf, downsample), *trunk,
                                   *decoder(out_channels, ngf, upsample))
        init_weights(self)

    def forward(self, x):
        return self.model(x)
