"""History of generated images (Shrivastava et al. 2017), as used by CycleGAN.

The discriminator is shown a fake drawn from the last `size` generated images half of the time, which
damps the oscillation between generator and discriminator.
"""

from __future__ import annotations

import random

import torch


class ImagePool:
    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)  # its own generator, saved with the pool, so a resumed run draws the same

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch like `images`: each entry is the new image, or (half the time once the pool is
        full) an older one that the new image replaces in the pool."""
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() > 0.5:
                i = self.rng.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": [t.cpu() for t in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.images = [t.to(device) for t in state["images"]]
        self.rng.setstate(_as_tuple(state["rng"]))


def _as_tuple(x):
    # random.setstate wants tuples; a round trip through some serialisers turns them into lists.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
