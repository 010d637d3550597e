"""A real photo folder holds every kind of odd file. Each one is answered with one line naming the file and
the reason, in `train` and in `apply`, while the run goes on; odd but valid pictures are used."""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import PAINTINGS, PHOTOS, tiny_config
from styleshift.cli import main
from styleshift.images import ImageError, read_image

# name -> what the one line must say (None: a valid picture, which must be converted or trained on).
HOSTILE = {
    "zero.jpg": "empty file",
    "truncated.jpg": "corrupt or truncated",
    "truncated.png": "corrupt or truncated",
    "text.jpg": "not a picture",
    "bomb.png": "decompression bomb",
    "selfloop.jpg": "symbolic link loop",
    "broken-link.jpg": "broken symbolic link",
    "fifo.jpg": "not a regular file",
    "unreadable.jpg": "permission denied",
}
VALID = ["rgb16.png", "cmyk.jpg", "palette-transparent.png", "grey-alpha.png", "grey16.png", "animated.gif",
         "animated.webp", "multipage.tif", "tiny.png"]


def _png_declaring(width, height):
    """A few hundred bytes of PNG whose header declares width x height pixels: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_hostile_folder(folder):
    folder.mkdir(parents=True)
    with Image.open(PHOTOS[0]) as im:
        photo = im.convert("RGB").resize((96, 64))
    good = folder / "good.jpg"
    photo.save(good)
    Image.open(PHOTOS[1]).convert("RGB").resize((80, 80)).save(folder / "good2.png")

    (folder / "zero.jpg").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    photo.save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "full.png").unlink()
    (folder / "text.jpg").write_text("these are not the pixels you are looking for\n")
    (folder / "bomb.png").write_bytes(_png_declaring(100_000, 100_000))
    os.symlink("selfloop.jpg", folder / "selfloop.jpg")
    os.symlink("no-such-picture.jpg", folder / "broken-link.jpg")
    os.mkfifo(folder / "fifo.jpg")
    photo.save(folder / "unreadable.jpg")
    (folder / "unreadable.jpg").chmod(0)  # root still reads it: the tests below also refuse it by hand

    rgb16 = (np.asarray(photo).astype(np.uint16) * 257)[..., ::-1]
    cv2.imwrite(str(folder / "rgb16.png"), np.ascontiguousarray(rgb16))
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    palette = photo.convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette-transparent.png", transparency=0)
    photo.convert("LA").save(folder / "grey-alpha.png")
    Image.fromarray((np.asarray(photo.convert("L")).astype(np.uint16) * 257)).save(folder / "grey16.png")
    black = Image.new("RGB", photo.size)
    photo.save(folder / "animated.gif", save_all=True, append_images=[black], duration=100, loop=0)
    photo.save(folder / "animated.webp", save_all=True, append_images=[black], duration=100)
    photo.save(folder / "multipage.tif", save_all=True, append_images=[black])
    photo.resize((20, 14)).save(folder / "tiny.png")  # smaller than a 32 px training crop
    photo.resize((1, 5000)).save(folder / "strip.png")  # 1 x 5000: one pixel wide

    # A folder linking back to its parent: scanning must end, and say why it skipped it.
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "back-to-top")
    return folder


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return make_hostile_folder(tmp_path_factory.mktemp("hostile") / "photos")


@pytest.fixture
def unreadable_is_refused(monkeypatch):
    """Root reads a file whatever its mode; refuse unreadable.jpg as the system refuses it to everyone else."""
    original = Image.open

    def open_(fp, *args, **kwargs):
        if str(fp).endswith("unreadable.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)


@pytest.mark.parametrize("name", VALID)
def test_odd_but_valid_pictures_decode_to_rgb(hostile, name):
    picture = read_image(hostile / name)
    assert picture.pixels.ndim == 3 and picture.pixels.shape[2] == 3
    assert picture.pixels.dtype == (np.uint16 if name in ("rgb16.png", "grey16.png") else np.uint8)


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp", "multipage.tif"])
def test_animations_and_multipage_files_give_their_first_frame(hostile, name):
    pixels = read_image(hostile / name).pixels.astype(float)
    reference = read_image(hostile / "good.jpg").pixels.astype(float)
    assert np.abs(pixels - reference).mean() < 12  # the photo (GIF's palette costs a little), not the black frame


@pytest.mark.parametrize("name, reason", sorted(HOSTILE.items()))
def test_each_hostile_file_is_one_line_naming_it_and_the_reason(hostile, unreadable_is_refused, name, reason):
    with pytest.raises(ImageError) as caught:
        read_image(hostile / name)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(hostile / name)) and reason in message


def test_max_pixels_lowers_and_lifts_the_bomb_guard(hostile):
    with pytest.raises(ImageError, match="--max-pixels"):
        read_image(hostile / "good.jpg", max_pixels=1000)
    assert read_image(hostile / "good.jpg", max_pixels=96 * 64).width == 96
    # Lifted above Pillow's own guard, the bomb gets past the header check and fails as the damaged file it is.
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_image(hostile / "bomb.png", max_pixels=0)


def test_apply_converts_every_picture_and_names_every_bad_file(hostile, tiny_style, tmp_path, unreadable_is_refused):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["apply", str(hostile), "-o", str(out), "--style", str(tiny_style),
                                       "--engine", "torch", "--quiet"])
    assert result.exit_code == 1, result.output  # some files failed, and the run went to the end
    lines = result.output.splitlines()
    for name, reason in HOSTILE.items():
        assert any(line.startswith(f"failed: {hostile / name}") and reason in line for line in lines), name
    assert any("back-to-top" in line and "loop" in line for line in lines)
    for name in VALID + ["good.jpg", "good2.png", "strip.png"]:
        stem = (out / name).with_suffix(".png" if name.endswith(".gif") else (out / name).suffix)
        source, result_ = read_image(hostile / name), read_image(stem)
        assert (result_.width, result_.height) == (source.width, source.height), name
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary file left behind
    assert "converted 12, skipped 0 (already there), failed 9" in lines[-1]


def test_train_skips_each_bad_file_with_a_warning_and_trains_on_the_rest(hostile, tmp_path, unreadable_is_refused):
    from styleshift.trainer import Trainer

    paintings = tmp_path / "paintings"
    paintings.mkdir()
    for p in PAINTINGS[:3]:
        Image.open(p).convert("RGB").resize((64, 64)).save(paintings / p.name)
    # An epoch walks the larger domain (the photos), so every photo is decoded in it.
    cfg = tiny_config(hostile, paintings, steps=20, checkpoint_every=100, sample_every=100)
    with pytest.warns(UserWarning) as caught:
        result = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert result.step == 20
    messages = [str(w.message) for w in caught]
    for name, reason in {**HOSTILE, "strip.png": "too thin"}.items():
        assert any(str(hostile / name) in m and reason in m for m in messages), name
    assert any("back-to-top" in m and "loop" in m for m in messages)
    assert not any("tiny.png" in m for m in messages)  # smaller than the crop: upscaled, used
