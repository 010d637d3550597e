"""The run report: one HTML page with curves, sample grids, configuration and links, and what a browser shows."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import tiny_config
from styleshift import plots
from styleshift.cli import main
from styleshift.report import render, sample_grids, write_report
from styleshift.tblog import open_tensorboard
from styleshift.trainer import Trainer


@pytest.fixture(scope="module")
def run(sample_dirs, tmp_path_factory):
    """A tiny run that evaluated itself, so the report has every kind of curve."""
    run_dir = tmp_path_factory.mktemp("report") / "painted"
    Trainer(tiny_config(*sample_dirs, name="painted", steps=4, eval_every=2, sample_every=2), run_dir,
            progress=False).fit()
    return run_dir


def test_training_writes_the_report_with_curves_grids_config_and_links(run):
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "step 4" in page
    charts = re.findall(r'class="chart"', page)
    assert len(charts) == 6  # generator, discriminator, speed, SWD, PSNR, SSIM
    assert "SWD to the style set" in page and "Cycle reconstruction PSNR" in page
    grids = re.findall(r'<img class="grid" alt="samples at step (\d+)" src="([^"]+)"', page)
    assert [int(s) for s, _ in grids] == [4, 2, 4]  # the latest, then all over time
    assert all((run / src).is_file() for _, src in grids)  # relative to the run directory
    assert 'href="painted.safetensors"' in page and "crop_size" in page and "generator.arch" in page


def test_curves_are_png_with_matplotlib_and_svg_without(run, monkeypatch):
    pytest.importorskip("matplotlib")
    assert render(run).count('src="data:image/png;base64,') == 6
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    page = render(run)
    assert page.count("<svg") == 6 and "data:image/png" not in page and "<polyline" in page


def test_embedded_report_stands_alone(run, tmp_path):
    page = render(run, embed=True)
    assert 'src="samples/' not in page and page.count('class="grid"') == 3
    moved = tmp_path / "report.html"
    moved.write_text(page)
    assert "data:image/png;base64," in moved.read_text()


def test_report_command_and_a_run_without_metrics(run, tmp_path, monkeypatch):
    result = CliRunner().invoke(main, ["report", str(run), "--svg"])
    assert result.exit_code == 0 and str(run / "report.html") in result.output
    monkeypatch.setenv("STYLESHIFT_RUNS", str(run.parent))
    assert CliRunner().invoke(main, ["report", "painted"]).exit_code == 0
    assert CliRunner().invoke(main, ["report"]).exit_code == 0  # the latest run
    result = CliRunner().invoke(main, ["report", "missing"])
    assert result.exit_code == 2 and "not found" in result.output
    (tmp_path / "config.json").write_text('{"name": "fresh"}')
    assert "No metrics logged yet" in write_report(tmp_path).read_text()


def test_sample_grids_keep_the_first_and_the_latest(tmp_path):
    (tmp_path / "samples").mkdir()
    for step in range(100, 2100, 100):
        (tmp_path / "samples" / f"step_{step:07d}.png").write_bytes(b"")
    steps = [s for s, _ in sample_grids(tmp_path)]
    assert len(steps) == 8 and steps[0] == 100 and steps[-1] == 2000 and steps == sorted(steps)


def test_tensorboard_missing_is_one_line_not_a_crash(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were absent
    assert open_tensorboard(tmp_path / "tensorboard") is None
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "tensorboard package is not installed" in err


# -- in a real browser -------------------------------------------------------------------------------------------
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def browser(page, tmp_path, *args) -> subprocess.CompletedProcess:
    # Without the networking switches headless Chromium waits on a closed network for minutes.
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_the_report_shows_its_curves_and_grids_in_headless_chromium(run, tmp_path):
    page = run / "report.html"
    dom = browser(page, tmp_path, "--dump-dom").stdout
    assert dom.count('class="chart"') == 6 and dom.count('class="grid"') == 3

    shot = tmp_path / "shot.png"
    browser(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20  # not a blank page

    def has_colour(hex_colour: str) -> bool:
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        return bool((np.abs(pixels - rgb).sum(axis=-1) < 30).sum() > 50)

    # The curves' line colours are drawn...
    assert has_colour(plots.COLOURS[0]) and has_colour(plots.COLOURS[1])
    # ...and the sample grids' photographs: thousands of distinct colours no chart or text produces.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 3000
