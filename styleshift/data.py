"""Training data: two unpaired folders, decoded robustly, augmented with albumentations, and sampled as
the reference CycleGAN does (an epoch walks the larger domain; the other is drawn at random).

Every random choice of a sample (which image of the smaller domain, the crop, the flip) is derived from
(seed, epoch, position), so a resumed run sees exactly the data an uninterrupted run would have seen,
whatever the number of loader workers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would otherwise ask PyPI at import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

from .images import ImageError, probe_image, read_rgb8, scan_images  # noqa: E402


class DataError(ValueError):
    """A training folder that cannot be used (missing, or without a single usable picture)."""


# A training picture must have some extent both ways; smaller ones (down to this) are upscaled to the load
# size, and very elongated ones are centre-cropped to MAX_ASPECT first (a 1 x 5000 strip would otherwise
# become 143 x 715,000 pixels).
MIN_SIDE = 8
MAX_ASPECT = 4.0


def find_training_images(folder: str | os.PathLike, role: str, max_pixels: int | None = None) -> list[Path]:
    """Usable pictures under `folder`; files that are not pictures, or too thin to learn from, are skipped
    with a warning naming each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {role} folder not found")
    files, bad = [], []
    for path in scan_images(folder):
        try:
            w, h = probe_image(path, max_pixels)
            if min(w, h) < MIN_SIDE:
                raise ImageError(path, f"{w}x{h} is too thin to learn from (a side under {MIN_SIDE} pixels)")
            files.append(path)
        except ImageError as e:
            bad.append(e)
            warnings.warn(f"skipping {e}", stacklevel=2)
    if not files:
        detail = f" ({len(bad)} unusable, first: {bad[0]})" if bad else ""
        raise DataError(f"{folder}: no usable image in the {role} folder{detail}")
    return files


def limit_aspect(image: np.ndarray, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """The central part of `image` whose long side is at most `max_aspect` times its short side."""
    h, w = image.shape[:2]
    if w > max_aspect * h:
        keep = int(max_aspect * h)
        return image[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    if h > max_aspect * w:
        keep = int(max_aspect * w)
        return image[(h - keep) // 2 : (h - keep) // 2 + keep]
    return image


def read_training_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8, aspect limited (see MAX_ASPECT); ImageError when it cannot be decoded."""
    return limit_aspect(read_rgb8(path, max_pixels))


def shorter_side_to(size: int) -> A.BasicTransform:
    # INTER_AREA averages when shrinking (no aliasing); the images are shrunk far more often than grown.
    return A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_AREA)


class DomainImages:
    """The pictures of one domain, each decoded and scaled once (shorter side = load size), then cached.

    A file that fails to decode is reported once and replaced by the next good one, never a crash.
    """

    def __init__(self, files: list[Path], load_size: int, cache_bytes: int = 1 << 30,
                 max_pixels: int | None = None) -> None:
        self.files = files
        self.resize = shorter_side_to(load_size)
        self.cache: dict[int, np.ndarray] = {}
        self.cache_left = cache_bytes
        self.bad: set[int] = set()
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            if j in self.cache:
                return self.cache[j]
            if j in self.bad:
                continue
            try:
                image = self.resize(image=read_training_image(self.files[j], self.max_pixels))["image"]
            except ImageError as e:
                self.bad.add(j)
                warnings.warn(f"skipping {e}", stacklevel=2)
                continue
            if image.nbytes <= self.cache_left:
                self.cache[j] = image
                self.cache_left -= image.nbytes
            return image
        raise DataError(f"{self.files[0].parent}: no image could be decoded")


class UnpairedDataset(Dataset):
    """Items are keyed by (index in A, index in B, augmentation seed); values are uint8 CHW tensors."""

    def __init__(self, files_A: list[Path], files_B: list[Path], load_size: int, crop_size: int, flip: bool = True,
                 max_pixels: int | None = None):
        self.A = DomainImages(files_A, load_size, max_pixels=max_pixels)
        self.B = DomainImages(files_B, load_size, max_pixels=max_pixels)
        steps = [A.RandomCrop(crop_size, crop_size)]
        if flip:
            steps.append(A.HorizontalFlip(p=0.5))
        self.augment = A.Compose(steps)

    def __len__(self) -> int:
        return max(len(self.A), len(self.B))

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        ia, ib, seed = key
        return {"A": self._sample(self.A[ia], seed), "B": self._sample(self.B[ib], seed + 1)}

    def _sample(self, image: np.ndarray, seed: int) -> torch.Tensor:
        self.augment.set_random_seed(seed)
        out = self.augment(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


class DomainSampler:
    """One domain's indices for one epoch, this rank's share.

    The larger domain is walked in a fresh random order each epoch (every image once); the smaller is
    drawn at random, as the reference draws its domain B. Like DistributedSampler, ranks take disjoint
    slices of the same order, and `set_epoch` reshuffles.
    """

    def __init__(self, size: int, epoch_length: int, seed: int, walk: bool, rank: int = 0, world_size: int = 1):
        self.size, self.epoch_length, self.seed, self.walk = size, epoch_length, seed, walk
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.walk:
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.randint(self.size, (self.epoch_length,), generator=g)
        return order[self.rank : self.epoch_length : self.world_size].tolist()


class PairSampler(Sampler):
    """Yields (index in A, index in B, augmentation seed) for this rank, one domain sampler each.

    Every rank takes the same number of samples (the remainder of an epoch is dropped), so distributed
    ranks stay in step. `set_epoch(epoch, start)` skips `start` samples: a run resumed mid-epoch goes on
    where it stopped.
    """

    def __init__(self, len_A: int, len_B: int, seed: int, rank: int = 0, world_size: int = 1):
        n = max(len_A, len_B)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.A = DomainSampler(len_A, n, seed * 2 + 1, walk=len_A >= len_B, rank=rank, world_size=world_size)
        self.B = DomainSampler(len_B, n, seed * 2 + 2, walk=len_B > len_A, rank=rank, world_size=world_size)
        self.per_rank = n // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.A.set_epoch(epoch)
        self.B.set_epoch(epoch)

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        ia, ib = self.A.indices(), self.B.indices()
        for pos in range(self.start, self.per_rank):
            seeds = np.random.SeedSequence([self.seed, self.epoch, pos * self.world_size + self.rank])
            yield ia[pos], ib[pos], int(seeds.generate_state(1)[0])


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # a loader worker should take one core, not all of them


def default_num_workers(device: torch.device, local_world_size: int = 1) -> int:
    cores = max(1, (os.cpu_count() or 1) // local_world_size)
    if device.type == "cpu":
        # Images are decoded once and cached, so one worker overlaps the little work left with the step
        # without taking a core from the training threads for long.
        return 1 if cores >= 2 else 0
    return min(8, max(1, cores - 1))


def make_loader(
    dataset: UnpairedDataset, sampler: PairSampler, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    if len(sampler) // batch_size == 0:
        raise DataError(f"batch size {batch_size} is larger than an epoch ({len(sampler)} images per process)")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # no worker restart (and 30 s stall) at each epoch
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
    )


def centre_crop(load_size: int, crop_size: int) -> A.Compose:
    """Shorter side to `load_size`, then the central `crop_size` square: how fixed and evaluated images are seen."""
    return A.Compose([shorter_side_to(load_size), A.CenterCrop(crop_size, crop_size)])


def fixed_images(files: list[Path], count: int, load_size: int, crop_size: int,
                 max_pixels: int | None = None) -> torch.Tensor:
    """The first `count` decodable images, centre-cropped as training sees them: a fixed set to watch."""
    prepare = centre_crop(load_size, crop_size)
    images = []
    for path in files:
        if len(images) == count:
            break
        try:
            image = prepare(image=read_training_image(path, max_pixels))["image"]
        except ImageError:
            continue
        images.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
    if not images:
        raise DataError(f"{files[0].parent}: no image could be decoded")
    return torch.stack(images)


def to_model_range(batch: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] on the device (converted there: a quarter of the bytes to move)."""
    x = batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
