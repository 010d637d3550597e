"""Loss functions of CycleGAN (Zhu et al. 2017, section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gan_loss(prediction: torch.Tensor, target_is_real: bool, mode: str = "lsgan") -> torch.Tensor:
    """Adversarial loss of a PatchGAN's patch-wise predictions against an all-real or all-fake target.

    lsgan:   E[(D(x) - t)^2]                  (Mao et al. 2017; the reference's default, more stable)
    vanilla: E[-t log s(D(x)) - (1-t) log(1 - s(D(x)))]   (Goodfellow et al. 2014, on logits)
    """
    prediction = prediction.float()  # reduce in fp32 under mixed precision
    target = torch.full_like(prediction, 1.0 if target_is_real else 0.0)
    if mode == "lsgan":
        return F.mse_loss(prediction, target)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(prediction, target)
    raise ValueError(f"unknown GAN loss {mode!r} (lsgan, vanilla)")


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(a.float(), b.float())


GAN_MODES = ("lsgan", "vanilla")
