"""Networks, chosen by name from small registry tables.

Network modules declare architecture only; losses, pools and schedules live in styleshift.cyclegan.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from ..config import DiscriminatorConfig, GeneratorConfig
from .patchgan import NLayerDiscriminator
from .resnet import ResnetGenerator

GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "resnet_9blocks": partial(ResnetGenerator, n_blocks=9),
    "resnet_6blocks": partial(ResnetGenerator, n_blocks=6),  # the reference's choice for 128 px
    "mobile_resnet": partial(ResnetGenerator, n_blocks=6, block="mobile"),
}

DISCRIMINATORS: dict[str, Callable[..., nn.Module]] = {
    "basic": partial(NLayerDiscriminator, n_layers=3),  # 70x70 PatchGAN
    "n_layers": NLayerDiscriminator,
}


def build_generator(cfg: GeneratorConfig) -> nn.Module:
    try:
        make = GENERATORS[cfg.arch]
    except KeyError:
        raise ValueError(f"unknown generator {cfg.arch!r}; choose from {', '.join(GENERATORS)}") from None
    extra = {} if cfg.n_blocks is None else {"n_blocks": cfg.n_blocks}
    return make(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, ngf=cfg.ngf,
        upsample=cfg.upsample, downsample=cfg.downsample, **extra,
    )


def build_discriminator(cfg: DiscriminatorConfig) -> nn.Module:
    try:
        make = DISCRIMINATORS[cfg.arch]
    except KeyError:
        raise ValueError(f"unknown discriminator {cfg.arch!r}; choose from {', '.join(DISCRIMINATORS)}") from None
    # "basic" fixes n_layers at 3; "n_layers" takes it from the config.
    extra = {} if cfg.arch == "basic" else {"n_layers": cfg.n_layers}
    return make(in_channels=cfg.in_channels, ndf=cfg.ndf, **extra)
