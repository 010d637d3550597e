"""Make the README's gallery: a few bundled sample photos next to the shipped default style's rendering.

    python scripts/make_gallery.py                 # -> data/gallery/*.jpg, from the shipped style
    python scripts/make_gallery.py --style monet   # any style, same pictures

Each picture is the photo (left) and the stylized photo (right), stylized at the photo's own resolution
by the library's Stylizer, then scaled to a small JPEG for the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from styleshift.fsutil import atomic_write  # noqa: E402
from styleshift.images import read_image  # noqa: E402
from styleshift.stylizer import Stylizer  # noqa: E402

PHOTOS = ["kodim23.jpg", "kodim03.jpg", "kodim21.jpg", "coffee.jpg"]
HEIGHT = 240  # pixels of each half in the repository copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", help="a style name or file [the shipped default]")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "gallery")
    args = parser.parse_args()
    stylizer = Stylizer(args.style, engine="torch")
    for name in PHOTOS:
        picture = read_image(ROOT / "data" / "sample" / "photos" / name)
        styled = stylizer.stylize_picture(picture)
        pair = np.concatenate([picture.rgb8(), np.full((picture.height, 8, 3), 255, np.uint8), styled.rgb8()], axis=1)
        im = Image.fromarray(pair)
        im = im.resize((round(im.width * HEIGHT / im.height), HEIGHT), Image.Resampling.LANCZOS)
        dst = args.out / f"{Path(name).stem}.jpg"
        atomic_write(dst, lambda f: im.save(f, format="JPEG", quality=85))
        print(f"wrote {dst.relative_to(ROOT) if dst.is_relative_to(ROOT) else dst} ({dst.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
