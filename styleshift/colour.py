"""How much of the style to keep: strength blending and colour preservation, applied after the generator.

Both work on N x 3 x H x W float tensors in [-1, 1] (the Stylizer's space), so 8- and 16-bit pictures are
treated alike.

strength s:      out = photo + s * (styled - photo)       s = 1: the style alone; s = 0: the photo back.

preserve colour: luminance-only transfer (Gatys, Bethge, Hertzmann & Shechtman 2016, "Preserving Color in
                 Neural Artistic Style Transfer"). In YCbCr (ITU-R BT.601, as kornia.color defines it)
                     out = RGB(Y_styled', Cb_photo, Cr_photo)
                 so the brush strokes and tonal texture come from the style and the hues from the photo.
                 With `match_luminance`, Y_styled' = (Y_styled - mean_s) * std_p / std_s + mean_p per image,
                 the paper's luminance matching, which also keeps the photo's overall brightness and
                 contrast; without it (the default) Y_styled' = Y_styled keeps the style's tone.
"""

from __future__ import annotations

import torch


def blend(styled: torch.Tensor, photo: torch.Tensor, strength: float) -> torch.Tensor:
    """styled at `strength` (0..1) over photo; both N x 3 x H x W in [-1, 1]."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength} is outside 0..1")
    if strength == 1.0:
        return styled
    return torch.lerp(photo, styled, strength)


def to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] RGB -> YCbCr with Y in [0, 1] and Cb, Cr centred on 0.5."""
    from kornia.color import rgb_to_ycbcr

    return rgb_to_ycbcr((x + 1.0) * 0.5)


def from_ycbcr(ycc: torch.Tensor) -> torch.Tensor:
    from kornia.color import ycbcr_to_rgb

    # A photo's chroma on a much brighter or darker luminance can leave the RGB gamut; clip it there.
    return ycbcr_to_rgb(ycc).clamp(0.0, 1.0) * 2.0 - 1.0


def preserve_colour(styled: torch.Tensor, photo: torch.Tensor, match_luminance: bool = False,
                    eps: float = 1e-5) -> torch.Tensor:
    """The styled luminance with the photo's chroma; both N x 3 x H x W in [-1, 1], float."""
    s, p = to_ycbcr(styled.float()), to_ycbcr(photo.float())
    y = s[:, :1]
    if match_luminance:
        ys, yp = y.flatten(1), p[:, :1].flatten(1)
        scale = yp.std(1) / ys.std(1).clamp_min(eps)
        y = (y - ys.mean(1)[:, None, None, None]) * scale[:, None, None, None] + yp.mean(1)[:, None, None, None]
    return from_ycbcr(torch.cat([y, p[:, 1:]], dim=1)).to(styled.dtype)
