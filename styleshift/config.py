"""Configuration as frozen dataclasses of plain values.

Every checkpoint and exported style carries its configuration as JSON, so a model is rebuilt from its
file alone: the reference CycleGAN keeps `opt.txt` apart and makes users repeat `--netG`, `--norm`,
`--no_dropout` at test time (its issues 461, 296, 980).

Defaults are the reference CycleGAN's (Zhu et al. 2017; junyanz/pytorch-CycleGAN-and-pix2pix).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class GeneratorConfig:
    arch: str = "resnet_9blocks"  # a name in styleshift.networks.GENERATORS
    ngf: int = 64  # filters in the first layer
    n_blocks: int | None = None  # residual blocks; None keeps the architecture's own number
    # "transpose" is the reference's transposed convolution; "resize" is upsample + conv, which cannot
    # make checkerboard artifacts (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts").
    upsample: str = "transpose"
    # "stride" is the reference's strided convolution (zero padding); "stride_reflect" the same with reflection
    # padding (no band along the top and left edges); "blur" low-passes before it (anti-aliasing,
    # Zhang 2019, "Making Convolutional Networks Shift-Invariant Again").
    downsample: str = "stride"
    in_channels: int = 3
    out_channels: int = 3


@dataclass(frozen=True)
class DiscriminatorConfig:
    arch: str = "basic"  # a name in styleshift.networks.DISCRIMINATORS
    ndf: int = 64
    n_layers: int = 3  # 3 gives the 70x70 PatchGAN
    in_channels: int = 3


@dataclass(frozen=True)
class TrainConfig:
    name: str = "style"
    content_dir: str = ""  # domain A: photos
    style_dir: str = ""  # domain B: paintings
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    # algorithm
    gan_mode: str = "lsgan"  # "lsgan" | "vanilla"
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # times lambda_cycle
    pool_size: int = 50
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # data
    batch_size: int = 1
    load_size: int = 286  # shorter side before the random crop
    crop_size: int = 256
    flip: bool = True
    max_pixels: int | None = None  # pictures with more are refused (decompression bombs); None: Pillow's limit
    # length: epochs at constant lr, then epochs of linear decay to zero; or a total in steps
    epochs: int = 100
    decay_epochs: int = 100
    steps: int | None = None  # when set, overrides epochs; the last `decay_steps` decay linearly
    decay_steps: int | None = None  # None: half of `steps`
    # machine
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None  # None: on where it measurably wins (see styleshift.precision)
    compile: bool = False
    # Winograd 3x3 convolutions on CPUs (styleshift.kernels): 0.85x the step time of a ResNet-9 at 256 px, but
    # gradients within 0.5% instead of 0.01% of exact, so opt-in for training (inference uses them).
    winograd: bool = False
    num_workers: int | None = None  # None: sized to the machine
    # bookkeeping
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # step checkpoints kept; latest.pt links the newest, a damaged one falls back
    num_samples: int = 3  # fixed images per domain in the sample grid
    eval_every: int = 0  # 0: never; see styleshift.evaluate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = _known(cls, data)
        data["generator"] = generator_from_dict(data.get("generator", {}))
        data["discriminator"] = DiscriminatorConfig(**_known(DiscriminatorConfig, data.get("discriminator", {})))
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


def generator_from_dict(data: dict[str, Any]) -> GeneratorConfig:
    return GeneratorConfig(**_known(GeneratorConfig, data))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Keep the keys `cls` knows, so a file written by a newer version still loads."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


# Options that may change when a run is resumed; everything else shapes the model or the algorithm
# and must match the checkpoint.
RESUMABLE = {
    "content_dir", "style_dir", "epochs", "decay_epochs", "steps", "decay_steps", "device", "precision",
    "channels_last", "compile", "winograd", "num_workers", "log_every", "sample_every", "checkpoint_every",
    "keep_checkpoints", "max_pixels", "eval_every",
}


# Presets are named bundles of defaults; explicit options still win over them.
PRESETS: dict[str, dict[str, Any]] = {
    # The reference CycleGAN's full setting.
    "reference": {},
    # For CPUs: a light generator of depthwise-separable residual blocks (GAN Compression, Li et al. 2020),
    # 16 filters, nearest-resize + convolution upsampling (no checkerboard, Odena et al. 2016), on 128 px crops:
    # about 0.06x the reference's step time. Chosen by pictures and SWD on the bundled sample (2400 steps,
    # SWD x1e3 mean at 256 px; photos vs paintings 126.6): this preset 77.5; with the reference's identity
    # weight 0.5: 100.2, its outputs keeping the photos' colours (the identity loss exists to preserve colour,
    # Zhu et al. 2017, sec. 5.2, which is what a painting style should change); with ICNR sub-pixel
    # upsampling (1500 steps): 155.8 and a visible grid; blur-pooled downsampling: rippled textures. Those
    # runs padded the strided convolutions with zeros, which drew a band along the top and left edges;
    # reflection padding (chosen afterwards, by pictures) removes it and changes nothing inside.
    "fast": {
        "generator": GeneratorConfig(arch="mobile_resnet", ngf=16, n_blocks=6, upsample="resize",
                                     downsample="stride_reflect"),
        "discriminator": DiscriminatorConfig(ndf=32, n_layers=3),
        "lambda_identity": 0.1,
        "load_size": 143,
        "crop_size": 128,
    },
}


def preset(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
