"""Stylizer: apply a trained style to pictures of any size (the library class behind `styleshift apply`)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Style, load_style
from .images import Picture
from .precision import Precision, resolve_device
from .tiling import choose_tile_size, make_plan, tiled_forward, working_memory


class Stylizer:
    """Load a style once, then stylize many images.

    >>> s = Stylizer("runs/impressionism")          # a run directory, a .safetensors file or a run name
    >>> out = s.stylize(pixels)                     # H x W x 3 uint8 (or uint16) -> same shape and dtype
    """

    def __init__(self, style: str | os.PathLike | Style, direction: str = "forward", device: str = "auto",
                 precision: str = "auto", tile_size: int | None = None) -> None:
        if not isinstance(style, Style):
            from .styles import find_style

            style = load_style(find_style(style))
        self.style = style
        self.direction = direction
        self.device = resolve_device(device)
        self.precision = Precision.resolve(precision, self.device)
        self.net = style.build(direction).to(self.device)
        self.multiple = getattr(self.net, "size_multiple", 4)
        # Pictures larger than the memory budget run in tiles of this many pixels a side, with whole-picture
        # normalisation statistics (styleshift.tiling): None sizes them to the budget, 0 never tiles.
        self.tile_size = tile_size
        self._plan = None

    @property
    def name(self) -> str:
        return self.style.name

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "Stylizer":
        return cls(load_style(path), **kwargs)

    def stylize(self, pixels: np.ndarray) -> np.ndarray:
        """H x W x 3 RGB, uint8 or uint16 -> the stylized picture, same size and dtype."""
        top = 65535.0 if pixels.dtype == np.uint16 else 255.0
        x = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).to(self.device).permute(2, 0, 1)[None].float()
        y = self.stylize_tensor(x.mul_(2.0 / top).sub_(1.0))
        out = y[0].permute(1, 2, 0).add(1.0).mul(top / 2.0).round_().clamp_(0, top)
        return out.cpu().numpy().astype(pixels.dtype)

    def stylize_picture(self, picture: Picture) -> Picture:
        """A decoded file (see styleshift.images) -> stylized, with its alpha, ICC profile and EXIF kept."""
        return replace(picture, pixels=self.stylize(picture.pixels))

    @torch.inference_mode()
    def stylize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W in [-1, 1] -> the same shape. Padded to the network's stride, then cropped back,
        so the output keeps the input's exact size (never squashed)."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            # Reflection continues the picture's texture at the border; it needs a side longer than the pad.
            mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        tile, budget = self._tiling(x)
        with self.precision.autocast():
            y = tiled_forward(self.net, x, self._plan, self.tile_size, budget) if tile else self.net(x)
        return y[..., :h, :w].float()

    def _tiling(self, x: torch.Tensor) -> tuple[int, int]:
        """(tile side, memory budget) for a padded batch; tile side 0 runs it whole."""
        if self.tile_size == 0:
            return 0, 0
        if self._plan is None:
            try:
                self._plan = make_plan(self.net, in_channels=x.shape[1])
            except ValueError:
                if self.tile_size is not None:
                    raise
                self.tile_size = 0  # a network tiling cannot reason about runs whole
                return 0, 0
        budget = working_memory(self.device)
        h, w = x.shape[-2:]
        if self.tile_size is None:
            return choose_tile_size(h, w * x.shape[0], self._plan, budget), budget
        return (self.tile_size if self.tile_size < max(h, w) else 0), budget
