
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from conftest import PHOTOS
from styleshift.images import ImageError, Picture, read_image, scan_images, write_image


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(PHOTOS[0]) as im:
        return im.convert("RGB").crop((0, 0, 61, 37))  # small, and not symmetric


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    photo.save(path, exif=exif.tobytes())
    pic = read_image(path)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(pic.pixels, expected)
    kept = Image.Exif()
    kept.load(pic.exif)
    assert kept.get(0x0112, 1) == 1  # written back upright: a viewer must not rotate again


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_decodes_to_rgb(tmp_path, photo, mode):
    if mode in ("I;16", "I", "F"):
        im = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.float32) * 257).astype(np.uint16)).convert(mode) \
            if mode != "I;16" else Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257))
    else:
        im = photo.convert(mode)
    ext = {"CMYK": "jpg", "F": "tif", "I": "tif"}.get(mode, "png")
    path = tmp_path / f"x.{ext}"
    im.save(path)
    pic = read_image(path)
    assert pic.pixels.shape == (37, 61, 3)
    rgb8 = pic.rgb8()
    assert rgb8.dtype == np.uint8
    grey = np.asarray(photo.convert("L"), dtype=np.float32)
    if mode in ("L", "I;16", "I", "F"):  # grey values survive, 16-bit ones scaled to 8 bits, not clipped
        assert np.abs(rgb8[..., 0].astype(np.float32) - grey).max() <= 1
    assert (pic.alpha is not None) == (mode in ("LA", "RGBA"))


def test_palette_transparency_becomes_alpha(tmp_path, photo):
    im = photo.convert("P")
    im.info["transparency"] = 0
    im.save(tmp_path / "t.png", transparency=0)
    assert read_image(tmp_path / "t.png").alpha is not None


def test_sixteen_bit_rgb_keeps_all_bits(tmp_path):
    import cv2

    rgb16 = (np.random.default_rng(0).random((9, 13, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), rgb16[..., ::-1])
    pic = read_image(tmp_path / "d.png")
    assert pic.pixels.dtype == np.uint16 and np.array_equal(pic.pixels, rgb16)
    assert np.abs(pic.rgb8().astype(int) - rgb16 / 257).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, not a picture", "not a picture"),
])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as e:
        read_image(path)
    assert str(e.value).startswith(str(path)) and reason in str(e.value) and "\n" not in str(e.value)


def test_truncated_jpeg_is_reported(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(PHOTOS[0].read_bytes()[:2000])
    with pytest.raises(ImageError, match="cut.jpg: corrupt or truncated"):
        read_image(path)


def test_write_keeps_alpha_icc_and_exif(tmp_path, photo):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # camera maker
    alpha = np.tile(np.arange(61, dtype=np.uint8) * 4, (37, 1))
    pic = Picture(np.asarray(photo), alpha, "PNG", srgb, exif.tobytes())
    for name in ("a.png", "a.webp", "a.tif", "a.jpg"):
        write_image(tmp_path / name, pic)
        with Image.open(tmp_path / name) as im:
            assert im.size == (61, 37)
            assert im.info.get("icc_profile") == srgb, name
            assert im.getexif().get(0x010F) == "TestCam", name
            if name != "a.jpg":  # JPEG has no alpha channel
                assert np.array_equal(np.asarray(im.getchannel("A")), alpha), name


def test_a_failed_write_leaves_no_file(tmp_path, photo):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")
    bad = Picture(np.zeros((0, 5, 3), np.uint8))  # PIL cannot save an empty image
    with pytest.raises(Exception):
        write_image(target, bad)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_scan_finds_images_recursively_and_skips_hidden(tmp_path):
    for rel in ("a.JPG", "sub/b.png", "sub/deeper/c.tiff", ".hidden/d.jpg", "._e.jpg", "f.txt", "out/g.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path, exclude=tmp_path / "out")]
    assert found == ["a.JPG", "sub/b.png", "sub/deeper/c.tiff"]


def test_sixteen_bit_png_is_written_with_all_bits_and_its_metadata(tmp_path):
    rng = np.random.default_rng(1)
    rgb16 = (rng.random((9, 13, 3)) * 65535).astype(np.uint16)
    alpha16 = (rng.random((9, 13)) * 65535).astype(np.uint16)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    write_image(tmp_path / "d.png", Picture(rgb16, alpha16, "PNG", srgb, exif.tobytes()))
    pic = read_image(tmp_path / "d.png")
    assert pic.pixels.dtype == np.uint16 and np.array_equal(pic.pixels, rgb16) and np.array_equal(pic.alpha, alpha16)
    assert pic.icc_profile == srgb
    kept = Image.Exif()
    kept.load(pic.exif)
    assert kept.get(0x010F) == "TestCam"
