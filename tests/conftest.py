"""Shared fixtures: small subsets of the bundled sample images and a tiny network configuration, so the
whole suite runs in minutes on two CPU cores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """ONNX exports made by `apply --engine auto|onnx` go to a temporary cache, not the user's (and the
    processes the distributed tests start inherit it)."""
    path = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("STYLESHIFT_CACHE")
    os.environ["STYLESHIFT_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("STYLESHIFT_CACHE")
    else:
        os.environ["STYLESHIFT_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def session_style_home(tmp_path_factory):
    """Styles registered while the session's fixtures train (and by the processes tests start) go to a
    temporary library, never the user's."""
    previous = os.environ.get("STYLESHIFT_HOME")
    os.environ["STYLESHIFT_HOME"] = str(tmp_path_factory.mktemp("home"))
    yield
    if previous is None:
        os.environ.pop("STYLESHIFT_HOME")
    else:
        os.environ["STYLESHIFT_HOME"] = previous


@pytest.fixture(autouse=True)
def style_home(tmp_path_factory, monkeypatch) -> Path:
    """Each test starts with an empty style library of its own."""
    path = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("STYLESHIFT_HOME", str(path))
    return path


SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
PHOTOS = sorted((SAMPLE / "photos").glob("*.jpg"))
PAINTINGS = sorted((SAMPLE / "paintings").glob("*.jpg"))


# `styleshift train` options for the tiny configuration below.
TINY_CLI = ["--generator", "resnet_6blocks", "--ngf", "4", "--n-blocks", "1", "--ndf", "4", "--load-size", "40",
            "--crop-size", "32", "--workers", "0", "--log-every", "1", "--quiet"]


def tiny_config(content, style, **overrides):
    from styleshift.config import DiscriminatorConfig, GeneratorConfig, TrainConfig

    values = dict(
        name="tiny", content_dir=str(content), style_dir=str(style),
        generator=GeneratorConfig(arch="resnet_6blocks", ngf=4, n_blocks=1),
        discriminator=DiscriminatorConfig(ndf=4),
        load_size=40, crop_size=32, steps=6, log_every=1, sample_every=3, checkpoint_every=3,
        num_samples=2, num_workers=0, seed=0, device="cpu", precision="fp32",
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def sample_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Four real photos and five real paintings (different sizes, so an epoch walks the paintings)."""
    root = tmp_path_factory.mktemp("sample")
    for name, files in (("photos", PHOTOS[:4]), ("paintings", PAINTINGS[:5])):
        (root / name).mkdir()
        for f in files:
            shutil.copy(f, root / name / f.name)
    return root / "photos", root / "paintings"


@pytest.fixture(scope="session")
def tiny_style(sample_dirs, tmp_path_factory) -> Path:
    """A style trained for a few steps: enough to exercise loading and applying, not to look good."""
    from styleshift.trainer import Trainer

    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = Trainer(tiny_config(*sample_dirs, steps=2), run, progress=False).fit()
    return result.style_path
