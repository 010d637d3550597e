"""ONNX export (styleshift.export) and the onnxruntime engine (styleshift.engine), on the sample photos."""

import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PHOTOS
from styleshift.checkpoint import Style, load_style
from styleshift.cli import main
from styleshift.config import GeneratorConfig
from styleshift.engine import cache_dir, cached_onnx
from styleshift.export import TOLERANCE, export_onnx, onnx_info, parity, parity_picture
from styleshift.networks import build_generator
from styleshift.stylizer import Stylizer

pytest.importorskip("onnxruntime")


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_export_round_trip_on_a_sample_photo(tiny_style, tmp_path):
    style = load_style(tiny_style)
    path = export_onnx(style, tmp_path / "tiny.onnx")
    info = onnx_info(path)
    assert info["generator"] == asdict(style.generator) and info["direction"] == "forward"
    assert info["size_multiple"] == 4
    x, source = parity_picture(style, "forward", PHOTOS[5])
    assert x.shape == (1, 3, 256, 384) and source == str(PHOTOS[5])
    assert parity(path, style, x) <= TOLERANCE
    # Height and width are dynamic, and so is the batch: a square pair of another size.
    small = torch.nn.functional.interpolate(torch.cat([x, x.flip(-1)]), size=(36, 36), mode="area")
    assert parity(path, style, small) <= TOLERANCE


@pytest.mark.parametrize("arch,upsample,downsample", [
    ("resnet_9blocks", "transpose", "stride"),
    ("resnet_6blocks", "resize", "blur"),
    ("mobile_resnet", "resize", "blur"),
    ("mobile_resnet", "transpose", "stride"),
    ("mobile_resnet", "subpixel", "stride"),
])
def test_every_generator_variant_exports_with_dynamic_size(arch, upsample, downsample, tmp_path):
    torch.manual_seed(0)
    cfg = GeneratorConfig(arch=arch, ngf=4, n_blocks=1, upsample=upsample, downsample=downsample)
    net = build_generator(cfg)
    torch.nn.init.normal_(net.model[1].weight, 0.0, 0.5)  # away from the near-zero start, so differences show
    style = Style(cfg, {"forward": net.state_dict(), "inverse": net.state_dict()})
    path = export_onnx(style, tmp_path / "g.onnx")
    x, _ = parity_picture(style, "forward", PHOTOS[6], size=(64, 96))
    assert parity(path, style, x) <= TOLERANCE
    y, _ = parity_picture(style, "forward", PHOTOS[7], size=(44, 28))
    assert parity(path, style, y) <= TOLERANCE


def test_export_command_prints_the_parity(tiny_style, tmp_path):
    code, out = run_cli("export", tiny_style, "--onnx", tmp_path / "m.onnx", "--direction", "inverse")
    assert code == 0, out
    assert "parity: max |onnx - torch| = " in out and "on a 256x384 sample photo" in out
    assert onnx_info(tmp_path / "m.onnx")["direction"] == "inverse"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left behind


def test_onnx_engine_writes_the_same_pictures_as_torch(tiny_style, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, p in enumerate(PHOTOS[8:11]):
        with Image.open(p) as im:
            im.convert("RGB").resize((90 + 13 * i, 70 - 7 * i)).save(src / f"{p.stem}.png")
    for engine in ("torch", "onnx"):
        code, out = run_cli("apply", src, "-o", tmp_path / engine, "--style", tiny_style, "--engine", engine, "--quiet")
        assert code == 0 and "converted 3" in out, out
    for p in src.iterdir():
        a, b = (np.asarray(Image.open(tmp_path / engine / p.name), dtype=int) for engine in ("torch", "onnx"))
        # The torch engine's Winograd convolutions (styleshift.kernels) round differently from exact ones:
        # a few pixels are off by up to 2-3 levels, on average far below one.
        assert a.shape == b.shape and np.abs(a - b).max() <= 3 and np.abs(a - b).mean() < 0.25


def test_the_export_is_cached_by_weights(tiny_style, tmp_path):
    style = load_style(tiny_style)
    first = cached_onnx(style, "forward")
    assert first.parent.parent == cache_dir()
    stamp = first.stat().st_mtime_ns
    assert cached_onnx(style, "forward") == first and first.stat().st_mtime_ns == stamp  # not exported again
    assert cached_onnx(style, "inverse") != first
    changed = Style(style.generator, {d: {k: v + 1 if v.is_floating_point() else v for k, v in w.items()}
                                      for d, w in style.weights.items()})
    assert cached_onnx(changed, "forward") != first


def test_auto_picks_an_engine_once_and_falls_back_to_torch(tiny_style, monkeypatch):
    s = Stylizer(tiny_style, device="cpu", engine="auto")
    choice = s.engine_for(64, 64)
    assert choice in ("torch", "onnx") and s.engine_for(32, 48) == choice
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert Stylizer(tiny_style, device="cpu", engine="auto").engine_for(64, 64) == "torch"


def test_onnx_engine_without_onnxruntime_is_one_clear_line(tiny_style, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    src = tmp_path / "p.jpg"
    Image.open(PHOTOS[0]).convert("RGB").resize((40, 30)).save(src)
    code, out = run_cli("apply", src, "--style", tiny_style, "--engine", "onnx")
    assert code == 2
    assert out.strip() == "error: the onnx engine needs onnxruntime and onnx: pip install 'styleshift[onnx]'"
    assert not (tmp_path / "p.tiny.jpg").exists()


def test_auto_keeps_torch_when_the_export_cannot_be_written(tiny_style, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("STYLESHIFT_CACHE", str(blocker / "cache"))  # under a file: no folder can be made
    s = Stylizer(tiny_style, device="cpu", precision="fp32", engine="auto")
    pixels = np.asarray(Image.open(PHOTOS[2]).convert("RGB").resize((40, 32)))
    assert np.array_equal(s.stylize(pixels), Stylizer(tiny_style, device="cpu", precision="fp32").stylize(pixels))
    assert s.engine_for(40, 32) == "torch"


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_auto_reads_the_free_memory_once_per_picture(tiny_style, monkeypatch, strength):
    """The engine and, where torch runs it, the tiles are chosen from one reading of the free memory: two
    readings could disagree (the engine chosen for a picture that needs tiles, which then runs whole)."""
    from styleshift import stylizer

    reads = []
    monkeypatch.setattr(stylizer, "available_memory", lambda device: reads.append(1) or 1 << 34)
    s = Stylizer(tiny_style, device="cpu", engine="auto", strength=strength)
    s._faster = "torch"  # as measured already (the measurement runs both engines once)
    pixels = np.asarray(Image.open(PHOTOS[1]).convert("RGB").resize((48, 40)))
    s.stylize(pixels)
    assert len(reads) == 1
