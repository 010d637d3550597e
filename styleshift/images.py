"""Reading and writing pictures the way users' folders hold them.

Every decoded picture is upright (EXIF orientation applied) RGB, 8 or 16 bits per channel, with its alpha
channel, ICC profile and EXIF kept aside so they survive a round trip. Anything that cannot be decoded
raises ImageError, whose message is one line naming the file and the reason: empty, truncated or
damaged files, files that are not pictures, decompression bombs (more pixels than `max_pixels`),
unreadable files. Animated GIF and WebP and multi-page TIFF give their first frame.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageFile

from .fsutil import atomic_open, atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FORMAT_OF_EXTENSION = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
    ".gif": "GIF",
}
EXTENSION_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
# Formats read but not written: a stylized painting in GIF's 256 colours would lose what it is for, so a
# GIF's output is a PNG (which keeps its transparency).
OUTPUT_FORMAT_OF = {"GIF": "PNG"}
ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}
SIXTEEN_BIT_FORMATS = {"PNG", "TIFF"}
# Pillow's own guard: twice Image.MAX_IMAGE_PIXELS, where it stops warning and refuses (a 13,000 x 13,000
# picture; the largest cameras make 100-200 megapixels). A few hundred bytes of PNG can declare more, and
# would take gigabytes to decode: a decompression bomb. `--max-pixels` changes it.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)

EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """A file that is not a usable picture. str() is '<path>: <reason>'."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Picture:
    pixels: np.ndarray  # H x W x 3, uint8 or uint16, upright
    alpha: np.ndarray | None = None  # H x W, same dtype as pixels
    format: str = "PNG"  # the source's format (a PIL name: JPEG, PNG, WEBP, BMP, TIFF)
    icc_profile: bytes | None = None  # an RGB profile; others do not describe the RGB pixels we keep
    exif: bytes | None = None  # orientation reset to 1, since the pixels are upright

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    def rgb8(self) -> np.ndarray:
        return to_uint8(self.pixels)


def to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    # 65535 -> 255 exactly, rounding to nearest.
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


# -- finding pictures -----------------------------------------------------------------------------------
def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_images(root: str | os.PathLike, exclude: str | os.PathLike | None = None,
                on_skip: Callable[[str], object] | None = None) -> list[Path]:
    """Image files under `root`, recursively, sorted; hidden files and folders (".thumbnails",
    macOS "._x.jpg" companions) are left out, as is the folder `exclude` (an output inside the input).

    Symbolic links to folders are followed, each real folder once: a link back to a folder already
    scanned (a loop) is skipped and reported through `on_skip` (default: a warning)."""
    root = Path(root)
    excluded = Path(exclude).resolve() if exclude is not None else None
    report = on_skip or (lambda message: warnings.warn(message, stacklevel=3))
    seen: set[tuple[int, int]] = set()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if not _first_visit(here, seen):
            dirnames[:] = []
            report(f"{here}: a link to a folder already scanned (a loop, or the same folder twice); skipped")
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _same_folder(here / d, excluded))
        found += [here / f for f in filenames if is_image_name(Path(f))]
    return sorted(found)


def _same_folder(folder: Path, other: Path | None) -> bool:
    try:
        return other is not None and folder.resolve() == other
    except (OSError, RuntimeError):  # a link loop: not the excluded folder; the walk reports it
        return False


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    try:
        st = folder.stat()
    except OSError:  # os.walk listed it a moment ago; whatever changed, it is no loop
        return True
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


# -- reading ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _open(path: Path, max_pixels: int | None = None) -> Iterator[ImageFile.ImageFile]:
    """Open `path` with PIL, turning every way a file can fail into one ImageError line. Only the header
    is read here, so a decompression bomb is refused before it takes any memory."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    _let_pillow_open(limit)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            # Opening a named pipe would wait for a writer forever; a device could be endless.
            raise ImageError(path, "not a regular file (a pipe, socket or device)")
        if st.st_size == 0:
            raise ImageError(path, "empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if limit and im.width * im.height > limit:
                    raise ImageError(path, f"{im.width}x{im.height} is more than {limit:,} pixels, a decompression "
                                           "bomb?; --max-pixels raises it")
                if im.width == 0 or im.height == 0:
                    raise ImageError(path, f"{im.width}x{im.height}: no pixels")
                im.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame
                yield im
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not a picture this tool can read (unknown or unsupported format)") from None
    except Image.DecompressionBombError as e:
        detail = str(e).split(", could be")[0]  # Pillow's "Image size (...) exceeds limit of ... pixels"
        raise ImageError(path, f"too many pixels, a decompression bomb? ({detail}); --max-pixels raises it") from None
    except FileNotFoundError:
        reason = "a broken symbolic link" if path.is_symlink() else "no such file"
        raise ImageError(path, reason) from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not a file") from None
    except PermissionError:
        raise ImageError(path, "permission denied (unreadable)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(path, "a symbolic link loop") from None
        if e.errno is not None:  # the system's error (EIO, ...); PIL reports damaged data without one
            raise ImageError(path, f"cannot read: {e.strerror or e}") from None
        raise ImageError(path, f"corrupt or truncated: {str(e).strip() or type(e).__name__}") from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        # PIL reports truncated or damaged data with any of these.
        reason = str(e).strip() or type(e).__name__
        raise ImageError(path, f"corrupt or truncated: {reason}") from None


def _let_pillow_open(limit: int) -> None:
    """Pillow refuses pictures over 2 x Image.MAX_IMAGE_PIXELS before we see them; a larger limit asked
    for (--max-pixels) raises Pillow's, for this process. 0 means no limit."""
    pillow = Image.MAX_IMAGE_PIXELS
    if pillow is not None and (limit == 0 or limit > 2 * pillow):
        Image.MAX_IMAGE_PIXELS = None if limit == 0 else limit // 2 + 1


def probe_image(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file's header alone, or ImageError: a quick check that a file is a picture."""
    with _open(Path(path), max_pixels) as im:
        return im.size


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> Picture:
    """Decode any supported file into an upright RGB Picture, or raise ImageError. `max_pixels`: the most
    pixels a picture may have [MAX_PIXELS]; 0 for no limit."""
    path = Path(path)
    with _open(path, max_pixels) as im:
        return _decode(path, im)


def _decode(path: Path, im: ImageFile.ImageFile) -> Picture:
    fmt = im.format or "PNG"
    sixteen_bit = im.mode in ("RGB", "RGBA") and _has_16bit_samples(im)  # before getexif(), which may decode
    exif = im.getexif()
    orientation = exif.get(EXIF_ORIENTATION, 1)
    icc = im.info.get("icc_profile")
    source_mode = im.mode
    if sixteen_bit:
        pixels, alpha = _read_16bit_rgb(path)
    else:
        im.load()  # decode now, inside the error handling
        pixels, alpha = _to_rgb(im)
    pixels = _orient(pixels, orientation)
    alpha = _orient(alpha, orientation) if alpha is not None else None
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = 1
    keep_icc = icc and source_mode in ("RGB", "RGBA", "P", "PA", "RGBX", "RGBa") and icc[16:20] == b"RGB "
    return Picture(
        pixels=np.ascontiguousarray(pixels),
        alpha=None if alpha is None else np.ascontiguousarray(alpha),
        format=fmt,
        icc_profile=icc if keep_icc else None,
        exif=exif.tobytes() if len(exif) else None,
    )


def _has_16bit_samples(im: Image.Image) -> bool:
    # PIL decodes 16-bit RGB(A) PNG and TIFF to 8 bits; the tile's raw mode says what the file holds.
    return any(";16" in str(tile.args) for tile in getattr(im, "tile", ()) or ())


def _read_16bit_rgb(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    import cv2  # OpenCV (installed with albumentations) keeps all 16 bits

    data = np.fromfile(path, dtype=np.uint8)
    a = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if a is None or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(path, "corrupt or truncated 16-bit image")
    if a.shape[2] == 4:
        return a[..., 2::-1], a[..., 3]
    return a[..., ::-1], None


def _to_rgb(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "RGBa", "La"):  # palette with alpha, premultiplied alpha
        im = im.convert("RGBA")
    elif im.mode == "L" and "transparency" in im.info:
        im = im.convert("LA")
    alpha = np.asarray(im.getchannel("A")) if im.mode in ("RGBA", "LA") else None
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit (or 32-bit integer) grey
        grey = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        return np.repeat(grey[..., None], 3, axis=2), None
    if im.mode == "F":  # floating-point grey: the smallest usual range that holds it, [0, 1], 8 or 16 bits
        grey = np.nan_to_num(np.asarray(im, dtype=np.float64))
        top = next((t for t in (1.0, 255.0, 65535.0) if grey.max() <= t), grey.max())
        grey16 = np.round(np.clip(grey / top, 0.0, 1.0) * 65535).astype(np.uint16)
        return np.repeat(grey16[..., None], 3, axis=2), None
    # RGB, RGBA, L, LA, 1, CMYK, YCbCr, LAB, HSV, ...
    return np.asarray(im.convert("RGB") if im.mode != "RGB" else im), alpha


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) so the pixels are upright, as a camera's viewer shows them."""
    ops = {
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.swapaxes(0, 1),
        6: lambda x: np.rot90(x, -1),
        7: lambda x: np.rot90(x, 2).swapaxes(0, 1),
        8: lambda x: np.rot90(x, 1),
    }
    op = ops.get(orientation)
    return op(a) if op else a


def read_rgb8(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    return read_image(path, max_pixels).rgb8()


# -- writing ---------------------------------------------------------------------------------------------
def format_for(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    try:
        return FORMAT_OF_EXTENSION[ext]
    except KeyError:
        raise ValueError(f"{path}: cannot tell the image format from {ext!r} ({', '.join(IMAGE_EXTENSIONS)})") from None


def write_image(path: str | os.PathLike, picture: Picture, fmt: str | None = None, quality: int = 95) -> None:
    """Write atomically (temporary file + rename) in `fmt` (default: from the extension), keeping the
    alpha channel, ICC profile and EXIF where the format can hold them."""
    fmt = fmt or format_for(path)
    if picture.pixels.dtype == np.uint16 and fmt == "PNG":
        blob = _png16(picture)
        atomic_write(path, lambda f: f.write(blob))
        return
    pixels = to_uint8(picture.pixels)
    im = Image.fromarray(pixels, "RGB")
    if picture.alpha is not None and fmt in ALPHA_FORMATS:
        im.putalpha(Image.fromarray(to_uint8(picture.alpha), "L"))
    options: dict = {}
    if picture.icc_profile and fmt != "BMP":
        options["icc_profile"] = picture.icc_profile
    if picture.exif and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        options["exif"] = picture.exif
    if fmt == "JPEG":
        options.update(quality=quality, subsampling=0)  # 4:4:4 keeps the colour of fine brush strokes
    elif fmt == "WEBP":
        options.update(quality=quality, method=4)
    elif fmt == "TIFF":
        options.update(compression="tiff_deflate")
    with atomic_open(path) as f:
        im.save(f, format=fmt, **options)


def _png16(picture: Picture) -> bytes:
    """A 16-bit RGB(A) PNG with the picture's ICC profile and EXIF.

    PIL writes RGB at 8 bits only; OpenCV writes all 16 but drops the metadata, so its iCCP and eXIf
    chunks are added here, after IHDR, where the PNG specification wants them (before any IDAT)."""
    import cv2

    bgr = picture.pixels[..., ::-1]
    if picture.alpha is not None:
        alpha = picture.alpha.astype(np.uint16) * (257 if picture.alpha.dtype == np.uint8 else 1)
        bgr = np.dstack([bgr, alpha])
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise OSError(f"cannot encode a {picture.width}x{picture.height} 16-bit PNG")
    png = encoded.tobytes()
    chunks = b""
    if picture.icc_profile:
        chunks += _png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(picture.icc_profile))
    if picture.exif:
        exif = picture.exif[6:] if picture.exif.startswith(b"Exif\0\0") else picture.exif
        chunks += _png_chunk(b"eXIf", exif)
    end_of_ihdr = 8 + 8 + 13 + 4  # signature, IHDR length and type, IHDR data, CRC
    return png[:end_of_ihdr] + chunks + png[end_of_ihdr:]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
