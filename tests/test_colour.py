"""Strength and colour preservation (styleshift.colour), on the bundled sample photos."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PHOTOS
from styleshift.cli import main
from styleshift.colour import blend, preserve_colour, to_ycbcr
from styleshift.stylizer import Stylizer


def photo(index=0, size=(96, 64)):
    with Image.open(PHOTOS[index]) as im:
        return np.asarray(im.convert("RGB").resize(size))


def as_tensor(pixels, top=255.0):
    return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] * (2.0 / top) - 1.0


def stylizer(style, **kwargs):
    return Stylizer(style, device="cpu", precision="fp32", **kwargs)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_strength_zero_gives_the_photo_back_and_one_the_plain_output(tiny_style, dtype):
    pixels = photo(1).astype(dtype) * (257 if dtype == np.uint16 else 1)
    plain = stylizer(tiny_style).stylize(pixels)
    assert np.abs(plain.astype(int) - pixels).max() > 10  # the style does change the photo
    assert np.abs(stylizer(tiny_style, strength=0.0).stylize(pixels).astype(int) - pixels).max() <= 1
    assert np.array_equal(stylizer(tiny_style, strength=1.0).stylize(pixels), plain)
    half = stylizer(tiny_style, strength=0.5).stylize(pixels).astype(float)
    assert np.abs(half - (plain.astype(float) + pixels) / 2).max() <= 1.0


def test_preserve_color_keeps_the_photos_chroma_and_the_styled_luminance(tiny_style):
    pixels = photo(2)
    plain = stylizer(tiny_style).stylize(pixels)
    kept = stylizer(tiny_style, preserve_color=True).stylize(pixels)
    ycc = {name: to_ycbcr(as_tensor(a))[0] * 255 for name, a in (("photo", pixels), ("plain", plain), ("kept", kept))}
    chroma_moved = (ycc["plain"][1:] - ycc["photo"][1:]).abs().mean()
    assert chroma_moved > 3  # without the option the style changes the colours
    # Clipping to the RGB gamut moves a few saturated pixels; the rest are exact to rounding.
    assert (ycc["kept"][1:] - ycc["photo"][1:]).abs().median() < 0.75
    assert (ycc["kept"][1:] - ycc["photo"][1:]).abs().mean() < chroma_moved / 5
    assert (ycc["kept"][0] - ycc["plain"][0]).abs().median() < 0.75


def test_preserve_colour_is_exact_where_nothing_clips():
    torch.manual_seed(0)
    photo_t = as_tensor(photo(3)) * 0.5  # a muted photo, so its chroma fits under any luminance below
    styled = torch.rand_like(photo_t) * 0.4 - 0.2
    out = preserve_colour(styled, photo_t)
    assert torch.allclose(to_ycbcr(out)[:, 1:], to_ycbcr(photo_t)[:, 1:], atol=1e-5)
    assert torch.allclose(to_ycbcr(out)[:, :1], to_ycbcr(styled)[:, :1], atol=1e-5)


def test_luminance_matching_takes_the_photos_brightness_and_contrast():
    # A darker, flatter copy of the photo: matched, its luminance is the photo's again (Y is linear in RGB).
    p = as_tensor(photo(4))
    dim = p * 0.3 - 0.2
    assert torch.allclose(preserve_colour(dim, p, match_luminance=True), p, atol=1e-4)
    assert (preserve_colour(dim, p) - p).abs().max() > 0.2


def test_blend_checks_its_range():
    with pytest.raises(ValueError):
        blend(torch.zeros(1), torch.zeros(1), 1.5)


def test_apply_options(tiny_style, tmp_path):
    src = tmp_path / "p.png"
    Image.fromarray(photo(0)).save(src)
    runner = CliRunner()
    result = runner.invoke(main, ["apply", str(src), "-o", str(tmp_path / "zero.png"), "--style", str(tiny_style),
                                  "--strength", "0", "--engine", "torch"])
    assert result.exit_code == 0, result.output
    assert np.abs(np.asarray(Image.open(tmp_path / "zero.png")).astype(int) - photo(0)).max() <= 1
    result = runner.invoke(main, ["apply", str(src), "-o", str(tmp_path / "kept.png"), "--style", str(tiny_style),
                                  "--preserve-color", "--strength", "0.7"])
    assert result.exit_code == 0 and (tmp_path / "kept.png").exists(), result.output
    result = runner.invoke(main, ["apply", str(src), "--style", str(tiny_style), "--strength", "1.5"])
    assert result.exit_code == 2 and "1.5" in result.output
