"""Offline measures of a translation: no pretrained network, nothing downloaded.

Sliced Wasserstein distance (SWD) over Laplacian-pyramid patches, after Karras et al., "Progressive
Growing of GANs" (ICLR 2018, sec. 5 and appendix D). It compares the distributions of small neighbourhoods
of two image sets, one pyramid level (one scale) at a time:

    1. Laplacian pyramid of each image: 5x5 binomial kernel [1,4,6,4,1] x [1,4,6,4,1] / 256, mirror padding;
       down = blur then keep every second pixel; up = insert zeros then blur with 4x the kernel; level i =
       Gaussian level i - up(Gaussian level i+1); the last level is the low-pass residual. Levels are taken
       from full resolution while the side is >= 16 (256 px gives 5 levels).
    2. At each level, 128 random 7x7x3 neighbourhoods per image: 147-dimensional descriptors.
    3. Descriptors normalised per colour channel. The paper uses each set's own mean and deviation, which
       hides global colour and contrast shifts, the very things a style changes; by default both sets use
       the *target* set's statistics ("target"), with the paper's way as the option "per-set".
    4. SWD = mean over 4 repeats of 128 random unit directions of W1(projected A, projected B), where the
       1-D Wasserstein distance compares sorted projections. Reported x 10^3, per level and averaged.

Every random draw comes from torch.Generators seeded from `seed`, so the same inputs give the same number.
Cycle reconstruction PSNR / SSIM (kornia.metrics) complete the picture: SWD says "looks like the style",
the cycle says "still the same picture".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from kornia.filters import filter2d

PATCH = 7  # neighbourhood side
MIN_LEVEL_SIZE = 16  # the coarsest level's side is at least this
NORMALIZATIONS = ("target", "per-set")
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
KERNEL = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0


# -- Laplacian pyramid --------------------------------------------------------------------------------------
def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    return filter2d(x, (KERNEL * gain).to(x)[None], border_type="reflect")


def pyramid_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[..., ::2, ::2]


def pyramid_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Insert zeros between samples, then blur with 4x the kernel (a quarter of the samples are non-zero)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return _blur(up, 4.0)[..., : size[0], : size[1]]


def pyramid_levels(size: int) -> int:
    """How many levels an image of side `size` gives (256 -> 5: 256, 128, 64, 32, 16)."""
    levels = 1
    while (size + 1) // 2 >= MIN_LEVEL_SIZE:
        size, levels = (size + 1) // 2, levels + 1
    return levels


def laplacian_pyramid(x: torch.Tensor) -> list[torch.Tensor]:
    """N x C x H x W float -> band-pass levels from full resolution down, then the low-pass residual."""
    gaussian = [x]
    for _ in range(pyramid_levels(min(x.shape[-2:])) - 1):
        gaussian.append(pyramid_down(gaussian[-1]))
    bands = [fine - pyramid_up(coarse, fine.shape[-2:]) for fine, coarse in zip(gaussian, gaussian[1:])]
    return bands + [gaussian[-1]]


# -- descriptors --------------------------------------------------------------------------------------------
def patch_centres(n: int, size: tuple[int, int], count: int, generator: torch.Generator) -> torch.Tensor:
    """n x count x 2 random (row, column) centres, at least PATCH // 2 pixels from the border."""
    r = PATCH // 2
    rows = torch.randint(r, size[0] - r, (n, count), generator=generator)
    cols = torch.randint(r, size[1] - r, (n, count), generator=generator)
    return torch.stack([rows, cols], dim=-1)


def gather_patches(level: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """N x C x H x W level, N x K x 2 centres -> (N*K) x (PATCH*PATCH) x C neighbourhoods, in one gather."""
    n, c = level.shape[:2]
    centres = centres.to(level.device)
    offsets = torch.arange(PATCH, device=level.device) - PATCH // 2
    rows = centres[..., 0, None, None] + offsets[:, None]  # N x K x 7 x 1
    cols = centres[..., 1, None, None] + offsets[None, :]  # N x K x 1 x 7
    batch = torch.arange(n, device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[batch, rows, cols]  # N x K x 7 x 7 x C
    return patches.reshape(-1, PATCH * PATCH, c)


def pyramid_descriptors(images: torch.Tensor, count: int, seed: int, device: torch.device | str | None = None,
                        chunk: int = 32) -> list[torch.Tensor]:
    """Per level, `count` neighbourhoods of every image: a list of (N*count) x 49 x C tensors on `device`.

    Images are N x 3 x H x W, uint8 or float in [0, 1]. The centres are drawn before the images are cut into
    chunks (to bound memory), so the result does not depend on the chunk size.
    """
    n, _, h, w = images.shape
    if min(h, w) < MIN_LEVEL_SIZE:
        raise ValueError(f"images of {w}x{h} px are too small for the SWD pyramid (at least {MIN_LEVEL_SIZE} px)")
    generator = torch.Generator().manual_seed(seed)
    sizes = [(h, w)]
    for _ in range(pyramid_levels(min(h, w)) - 1):
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    centres = [patch_centres(n, size, count, generator) for size in sizes]
    levels: list[list[torch.Tensor]] = [[] for _ in sizes]
    for start in range(0, n, chunk):
        batch = images[start : start + chunk].to(device)
        batch = batch.float() / 255.0 if not batch.is_floating_point() else batch.float()
        for i, level in enumerate(laplacian_pyramid(batch)):
            levels[i].append(gather_patches(level, centres[i][start : start + chunk]))
    return [torch.cat(parts) for parts in levels]


def channel_stats(desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return desc.mean(dim=(0, 1)), desc.std(dim=(0, 1)).clamp_min(1e-8)


def normalized(desc: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mean, std = stats
    return ((desc - mean) / std).flatten(1)


# -- distances ----------------------------------------------------------------------------------------------
def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W1 between the rows of two sorted sample sets (P x M and P x L) -> P distances.

    Equal sizes: mean |a_i - b_i|. Unequal sizes: the exact integral of |Qa(t) - Qb(t)| over t in (0, 1),
    both quantile functions being constant between the merged breakpoints k/M and k/L.
    """
    m, l = a.shape[1], b.shape[1]
    if m == l:
        return (a - b).abs().mean(dim=1)
    breaks = torch.cat([torch.arange(1, m + 1) / m, torch.arange(1, l + 1) / l]).double().sort().values
    widths = torch.diff(breaks, prepend=breaks.new_zeros(1))
    mids = breaks - widths / 2
    ia = (mids * m).long().clamp_max(m - 1).to(a.device)
    ib = (mids * l).long().clamp_max(l - 1).to(a.device)
    return ((a[:, ia] - b[:, ib]).abs() * widths.to(a)).sum(dim=1)


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    # On CPUs numpy's vectorised sort (x86-simd-sort) measured ~10x faster than torch's for these shapes;
    # sorting is most of the cost of SWD.
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, repeats: int = 4,
                       directions: int = 128) -> float:
    """Mean over `repeats` x `directions` random unit directions of W1 between the projected descriptors."""
    total = 0.0
    for _ in range(repeats):
        dirs = torch.randn(directions, a.shape[1], generator=generator).to(a)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        # One row per direction: sorting along the last, contiguous dimension is the fast way.
        pa, pb = sort_rows(dirs @ a.T), sort_rows(dirs @ b.T)
        total += wasserstein_1d(pa, pb).mean().item()
    return total / repeats


@dataclass
class SWDResult:
    levels: list[float]  # x 10^3, finest level first; the last is the low-pass residual
    resolutions: list[int]  # each level's side in pixels

    @property
    def mean(self) -> float:
        return sum(self.levels) / len(self.levels)

    def to_dict(self) -> dict:
        return {"levels": [round(v, 3) for v in self.levels], "resolutions": self.resolutions,
                "mean": round(self.mean, 3)}


class SlicedWasserstein:
    """SWD to a fixed target set: its descriptors are computed once, then `distance(images)` compares any
    number of sets with it, each with the same directions and (for sets of one shape) the same patch
    positions, so SWD(photos, paintings) and SWD(G(photos), paintings) are paired measurements.

    >>> swd = SlicedWasserstein(paintings)          # N x 3 x H x W uint8
    >>> swd.distance(photos).mean, swd.distance(translated).mean
    """

    def __init__(self, target: torch.Tensor, seed: int = 0, normalize: str = "target", patches: int = 128,
                 repeats: int = 4, directions: int = 128, device: torch.device | str | None = None) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalize!r}; choose from {', '.join(NORMALIZATIONS)}")
        self.seed, self.normalize, self.patches = seed, normalize, patches
        self.repeats, self.directions, self.device = repeats, directions, device
        self.size = min(target.shape[-2:])
        target_desc = pyramid_descriptors(target, patches, seed, device)
        self.stats = [channel_stats(d) for d in target_desc]
        self.target = [normalized(d, s) for d, s in zip(target_desc, self.stats)]

    def distance(self, images: torch.Tensor) -> SWDResult:
        desc = pyramid_descriptors(images, self.patches, self.seed + 1, self.device)
        if len(desc) != len(self.target):
            raise ValueError(f"image sets of different sizes ({min(images.shape[-2:])} and {self.size} px) give "
                             "different pyramids; bring them to one size first")
        generator = torch.Generator().manual_seed(self.seed + 2)  # the same directions for every call
        levels = []
        for d, t, stats in zip(desc, self.target, self.stats):
            d = normalized(d, stats if self.normalize == "target" else channel_stats(d))
            levels.append(1e3 * sliced_wasserstein(d, t, generator, self.repeats, self.directions))
        return SWDResult(levels, [(self.size + 2**i - 1) // 2**i for i in range(len(levels))])


def swd(a: torch.Tensor, b: torch.Tensor, seed: int = 0, normalize: str = "target", **kwargs) -> SWDResult:
    """SWD(a, b) x 10^3 per level; `b` is the target (its statistics normalise both sets by default)."""
    return SlicedWasserstein(b, seed, normalize, **kwargs).distance(a)


# -- cycle reconstruction -----------------------------------------------------------------------------------
def cycle_scores(real: torch.Tensor, reconstructed: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM of F(G(x)) against x; both N x 3 x H x W float in [0, 1]."""
    from kornia.metrics import psnr, ssim

    real, reconstructed = real.float(), reconstructed.float().clamp(0, 1)
    psnrs = [psnr(r[None], x[None], 1.0).item() for r, x in zip(reconstructed, real)]
    window = min(11, (min(real.shape[-2:]) - 1) | 1)  # odd, and no larger than the image
    ssims = ssim(reconstructed, real, window, padding="valid").mean(dim=(1, 2, 3)).tolist()
    return psnrs, ssims
