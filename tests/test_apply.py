import hashlib
import json
import os
import shutil
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PHOTOS
from styleshift.checkpoint import load_resume, load_style
from styleshift.cli import main
from styleshift.config import TrainConfig
from styleshift.engine import style_key
from styleshift.networks import build_generator
from styleshift.stylizer import Stylizer


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def photo_file(path, size=None, orientation=None, source=PHOTOS[0]):
    with Image.open(source) as im:
        im = im.convert("RGB")
        if size:
            im = im.resize(size)
        kwargs = {}
        if orientation:
            exif = Image.Exif()
            exif[0x0112] = orientation
            kwargs["exif"] = exif.tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, **kwargs)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_exported_style_rebuilds_with_no_flags_and_gives_identical_output(tiny_style):
    state = load_resume(tiny_style.parent / "latest.pt")
    cfg = TrainConfig.from_dict(state["config"])
    trained = build_generator(cfg.generator)
    trained.load_state_dict(state["model"]["nets"]["G_AB"])
    x = torch.rand(1, 3, 36, 44) * 2 - 1
    with torch.no_grad():
        expected = trained(x)
    style = load_style(tiny_style)
    assert torch.equal(style.build("forward")(x), expected)
    assert torch.equal(Stylizer(tiny_style, device="cpu", precision="fp32").stylize_tensor(x), expected)


def test_odd_sizes_are_kept_exactly(tiny_style, tmp_path):
    src = photo_file(tmp_path / "odd.png", size=(301, 157))
    code, out = run_cli("apply", src, "--style", tiny_style)
    assert code == 0, out
    with Image.open(tmp_path / "odd.tiny.png") as im:
        assert im.size == (301, 157)


def test_a_1000x667_jpeg_gives_a_1000x667_jpeg(tiny_style, tmp_path):
    src = photo_file(tmp_path / "big.jpg", size=(1000, 667))
    code, out = run_cli("apply", src, "-o", tmp_path / "out.jpg", "--style", tiny_style)
    assert code == 0, out
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.format == "JPEG" and im.size == (1000, 667)


def test_exif_rotation_is_honoured(tiny_style, tmp_path):
    # Stored 301 wide and 157 high, with "rotate 90 clockwise to view": upright it is 157 x 301.
    src = photo_file(tmp_path / "turned.jpg", size=(301, 157), orientation=6)
    code, out = run_cli("apply", src, "--style", tiny_style)
    assert code == 0, out
    with Image.open(tmp_path / "turned.tiny.jpg") as im:
        assert im.size == (157, 301)
        assert im.getexif().get(0x0112, 1) == 1


def test_a_folder_with_a_corrupt_file_converts_the_rest(tiny_style, tmp_path):
    src = tmp_path / "photos"
    for i, p in enumerate(PHOTOS[:3]):
        photo_file(src / ("sub" if i else "") / p.name, size=(64, 48), source=p)
    (src / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:1500])
    before = {p: digest(p) for p in src.rglob("*.jpg")}
    code, out = run_cli("apply", src, "-o", tmp_path / "out", "--style", tiny_style, "--quiet")
    assert code == 1
    assert "broken.jpg" in out and "converted 3" in out and "failed 1" in out
    outputs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jpg"))
    assert outputs == sorted([PHOTOS[0].name, f"sub/{PHOTOS[1].name}", f"sub/{PHOTOS[2].name}"])
    assert before == {p: digest(p) for p in src.rglob("*.jpg")}  # inputs untouched

    # Again: everything that exists is skipped, unless --overwrite.
    code, out = run_cli("apply", src, "-o", tmp_path / "out", "--style", tiny_style, "--quiet")
    assert "skipped 3" in out
    code, out = run_cli("apply", src, "-o", tmp_path / "out", "--style", tiny_style, "--quiet", "--overwrite")
    assert "converted 3" in out


def test_an_output_never_replaces_its_input(tiny_style, tmp_path):
    src = photo_file(tmp_path / "p.jpg", size=(40, 30))
    before = digest(src)
    code, out = run_cli("apply", src, "-o", src, "--style", tiny_style, "--overwrite")
    assert code == 1 and "replace the input" in out
    code, out = run_cli("apply", tmp_path, "-o", tmp_path, "--style", tiny_style)
    assert code != 0 and "input folder" in out
    assert digest(src) == before


def test_format_option_changes_the_extension_and_output_inside_input_is_not_rescanned(tiny_style, tmp_path):
    src = tmp_path / "photos"
    photo_file(src / "a.jpg", size=(40, 30))
    code, out = run_cli("apply", src, "-o", src / "styled", "--format", "png", "--style", tiny_style)
    assert code == 0, out
    assert (src / "styled" / "a.png").exists()
    code, out = run_cli("apply", src, "-o", src / "styled", "--format", "png", "--style", tiny_style)
    assert "skipped 1" in out and "failed 0" in out  # its own outputs were not taken as inputs


def test_style_is_found_by_run_name_directory_or_file(tiny_style, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLESHIFT_RUNS", str(tiny_style.parent.parent))
    src = photo_file(tmp_path / "p.png", size=(40, 30))
    for spec in ("tiny", tiny_style.parent, tiny_style):
        code, out = run_cli("apply", src, "--style", spec, "--overwrite")
        assert code == 0, out
    code, out = run_cli("apply", src, "--style", "no-such-style")
    assert code == 2 and "not found" in out


def test_a_stylizer_holds_one_copy_of_one_direction_s_weights(tiny_style):
    style = load_style(tiny_style)
    for precision in ("fp32", "bf16"):
        s = Stylizer(style, direction="inverse", device="cpu", precision=precision)
        kept = s.style.weights
        assert list(kept) == ["inverse"] and set(style.weights) == {"forward", "inverse"}  # the caller's is intact
        assert all(torch.equal(kept["inverse"][k], v) for k, v in style.weights["inverse"].items())
        assert all(v.dtype == torch.float32 for v in kept["inverse"].values())  # what ONNX export needs
    # in fp32 the network computes with those very tensors: no second copy
    s = Stylizer(style, direction="inverse", device="cpu", precision="fp32")
    assert all(p.data_ptr() == s.style.weights["inverse"][name].data_ptr() for name, p in s.net.named_parameters())


def test_a_bf16_stylizer_reads_its_fp32_weights_from_its_file_again(tiny_style, tmp_path):
    """A bf16 network loaded from a style file keeps no fp32 copy of its weights: `style` (what ONNX export and
    its cache key use) reads them from the file again, the same as an fp32 Stylizer holds; a file whose
    weights changed since it was loaded is refused, rather than exporting weights other than those running,
    even when rewritten in place at the same size and time. One only touched still holds them."""
    path = tmp_path / "mine.safetensors"
    shutil.copy(tiny_style, path)
    low = Stylizer(path, direction="inverse", device="cpu", precision="bf16")
    assert low._style.weights == {}  # (private: nothing public shows what a Stylizer holds)
    full = Stylizer(path, direction="inverse", device="cpu", precision="fp32").style
    again = low.style
    assert list(again.weights) == ["inverse"] and again.name == full.name == low.name
    assert all(torch.equal(again.weights["inverse"][k], v) for k, v in full.weights["inverse"].items())
    assert style_key(again, "inverse", 17) == style_key(full, "inverse", 17)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: the same weights
    assert style_key(low.style, "inverse", 17) == style_key(full, "inverse", 17)
    st = path.stat()
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])  # safetensors: header length, JSON header, then the data
    header = json.loads(path.read_bytes()[8:8 + n])
    start = 8 + n + next(v["data_offsets"][0] for k, v in header.items() if k.startswith("inverse."))
    with open(path, "r+b") as f:  # one weight rewritten in place: same inode and size, and the same time again
        f.seek(start)
        f.write(struct.pack("<f", 1.5))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_ino == st.st_ino
    with pytest.raises(ValueError, match="mine.safetensors.*changed"):
        low.style  # noqa: B018
    path.unlink()
    with pytest.raises(ValueError, match="mine.safetensors"):
        low.style  # noqa: B018
    with pytest.raises(ValueError, match="no such style file"):
        Stylizer.from_file(path)  # a file, never a style of that name elsewhere


def test_a_stylizer_reads_its_style_file_again_from_any_directory(tiny_style, tmp_path, monkeypatch):
    """The file is read again by its absolute path: a program that changes its working directory after
    loading a style by a relative path still exports it."""
    shutil.copy(tiny_style, tmp_path / "mine.safetensors")
    monkeypatch.chdir(tmp_path)
    low = Stylizer("mine.safetensors", device="cpu", precision="bf16")
    monkeypatch.chdir(tmp_path.parent)
    assert low.style.path == tmp_path / "mine.safetensors" and low.style.weights["forward"]


def test_the_onnx_engine_keeps_the_weights_it_will_export(tiny_style):
    """The onnx engine exports on its first picture: it holds the fp32 weights from the start, so a training
    run that replaces the style file meanwhile cannot make that export fail."""
    pytest.importorskip("onnxruntime")
    s = Stylizer(tiny_style, device="cpu", precision="bf16", engine="onnx")
    assert s._style.weights["forward"]


def test_inverse_direction_uses_the_other_generator(tiny_style):
    pixels = np.asarray(Image.open(PHOTOS[1]).convert("RGB").resize((48, 32)))
    forward = Stylizer(tiny_style, device="cpu").stylize(pixels)
    inverse = Stylizer(tiny_style, direction="inverse", device="cpu").stylize(pixels)
    assert forward.shape == inverse.shape == pixels.shape and not np.array_equal(forward, inverse)


def test_overlapped_conversion_reports_in_order_and_converts_the_rest(tmp_path):
    from styleshift.apply import Job, convert

    src, out = tmp_path / "in", tmp_path / "out"
    names = [f"{i:02d}.png" for i in range(9)]
    for i, name in enumerate(names):
        photo_file(src / name, size=(24 + i, 16), source=PHOTOS[i % 4])
    (src / "03.png").write_bytes(b"not a picture")
    (out / "05.png").parent.mkdir(parents=True)
    (out / "05.png").write_bytes(b"already there")
    jobs = [Job(src / n, out / n, "PNG") for n in names] + [Job(src / "00.png", out / "07.png", "PNG")]

    def stylize(picture):
        if picture.width == 24 + 6:
            raise RuntimeError("out of memory\nmore detail")
        return replace(picture, pixels=255 - picture.pixels)

    lines = []
    summary = convert(jobs, stylize, progress=False, report=lines.append, ahead=2)
    assert [line.split(":")[1].strip() for line in lines] == [str(src / n) for n in ("03.png", "06.png", "00.png")]
    assert "out of memory" in lines[1] and "also the output of" in lines[2]
    assert (summary.converted, summary.skipped, len(summary.failed)) == (6, 1, 3)
    assert (out / "05.png").read_bytes() == b"already there"
    for n in ("00.png", "01.png", "08.png"):
        assert np.array_equal(np.asarray(Image.open(out / n)), 255 - np.asarray(Image.open(src / n)))
    assert sorted(p.name for p in out.iterdir()) == sorted(set(names) - {"03.png", "06.png"})  # no temporary files


def test_alpha_icc_and_sixteen_bits_survive_apply(tiny_style, tmp_path):
    import cv2
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with Image.open(PHOTOS[1]) as im:
        rgb = im.convert("RGB").resize((60, 44))
    alpha = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8) * 4, (44, 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    rgba.save(tmp_path / "a.png", icc_profile=srgb)
    rgb.save(tmp_path / "c.jpg", icc_profile=srgb, quality=95)
    deep = (np.asarray(rgb, dtype=np.uint16) * 257 + np.arange(60, dtype=np.uint16)[None, :, None])
    cv2.imwrite(str(tmp_path / "d.png"), np.dstack([deep[..., ::-1], np.full((44, 60), 40000, np.uint16)]))
    for name in ("a.png", "c.jpg", "d.png"):
        code, out = run_cli("apply", tmp_path / name, "--style", tiny_style, "--engine", "torch")
        assert code == 0, out
    with Image.open(tmp_path / "a.tiny.png") as im:
        assert np.array_equal(np.asarray(im.getchannel("A")), np.asarray(alpha))
        assert im.info.get("icc_profile") == srgb
    with Image.open(tmp_path / "c.tiny.jpg") as im:
        assert im.info.get("icc_profile") == srgb
    styled = cv2.imread(str(tmp_path / "d.tiny.png"), cv2.IMREAD_UNCHANGED)
    assert styled.dtype == np.uint16 and styled.shape == (44, 60, 4) and (styled[..., 3] == 40000).all()
    assert (styled[..., :3] % 257 != 0).any()  # not 8-bit values scaled up
