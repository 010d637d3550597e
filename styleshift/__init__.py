"""styleshift: learn an art style from two unpaired folders of images, and apply it to photos.

    from styleshift import TrainConfig, train, Stylizer
    train(TrainConfig(name="impressionism", content_dir="photos", style_dir="paintings", steps=2000))
    Stylizer("impressionism").stylize(pixels)

Attributes are imported on first use, so `import styleshift` (and `styleshift --help`) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": "styleshift.config",
    "GeneratorConfig": "styleshift.config",
    "DiscriminatorConfig": "styleshift.config",
    "train": "styleshift.trainer",
    "Trainer": "styleshift.trainer",
    "Stylizer": "styleshift.stylizer",
    "load_style": "styleshift.checkpoint",
    "read_image": "styleshift.images",
    "write_image": "styleshift.images",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'styleshift' has no attribute {name!r}")
