"""Never lose work: checkpoints that survive being killed at any moment, damaged files that are detected and
stepped over, pickles that are refused, and a full or read-only disk that stops a run cleanly."""

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PHOTOS, TINY_CLI, tiny_config
from styleshift import fsutil
from styleshift.checkpoint import (RESUME_FORMAT, CheckpointError, UnsafeCheckpoint, checkpoint_files, find_resume,
                                   load_resume)
from styleshift.cli import main
from styleshift.images import read_image
from styleshift.trainer import Trainer


@pytest.fixture(scope="module")
def trained(sample_dirs, tmp_path_factory):
    """A run with checkpoints at steps 2, 4, 6, 8 (three kept)."""
    run = tmp_path_factory.mktemp("crash") / "run"
    Trainer(tiny_config(*sample_dirs, name="crash", steps=8, checkpoint_every=2, keep_checkpoints=3), run,
            progress=False).fit()
    return run


def copy_run(run, to):
    import shutil

    shutil.copytree(run, to, symlinks=True)
    return to


def test_the_last_n_checkpoints_are_kept_each_with_its_checksum(trained):
    files = checkpoint_files(trained)
    assert [f.name for f in files] == ["step_00000008.pt", "step_00000006.pt", "step_00000004.pt"]
    for f in files:
        digest, name = (f.parent / (f.name + ".sha256")).read_text().split()
        assert name == f.name and digest == hashlib.sha256(f.read_bytes()).hexdigest()
    latest = trained / "latest.pt"
    assert latest.resolve() == files[0].resolve() and torch.load(latest, weights_only=True)["step"] == 8


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "emptied"])
def test_a_damaged_latest_is_detected_and_the_previous_good_one_used(trained, tmp_path, damage):
    run = copy_run(trained, tmp_path / "run")
    newest = checkpoint_files(run)[0]
    data = bytearray(newest.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncated":
        data = data[: len(data) // 3]
    else:
        data = b""
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"latest.pt: damaged.*resuming from .*step_00000006.pt \(step 6\)"):
        path, state = find_resume(run)
    assert state["step"] == 6

    # And the run resumes from there, and overwrites the damaged step with a good one.
    cfg = tiny_config(state["config"]["content_dir"], state["config"]["style_dir"], name="crash", steps=10,
                      checkpoint_every=2)
    with pytest.warns(UserWarning, match="damaged"):
        result = Trainer(cfg, run, progress=False).fit()
    assert result.step == 10
    assert all(load_resume(f)["step"] == int(f.stem[5:]) for f in checkpoint_files(run))


def test_when_no_checkpoint_is_good_the_error_says_so_and_nothing_is_overwritten(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    for f in checkpoint_files(run):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*--fresh"):
        find_resume(run)
    result = CliRunner().invoke(main, ["train", "--run-dir", str(run), "--quiet"])
    assert result.exit_code == 2 and "no usable checkpoint" in result.output
    assert all(f.read_bytes() == b"not a checkpoint" for f in checkpoint_files(run))


class Payload:
    """Pickles to a call of exec(): what a crafted checkpoint would run on an unsafe torch.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_pickle_carrying_a_payload_is_refused_and_never_runs(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    crafted = {"format": RESUME_FORMAT, "config": {}, "step": 99, "model": Payload(marker)}
    (run / "latest.pt").unlink()
    torch.save(crafted, run / "latest.pt")

    # The payload is live: an unsafe load runs it.
    torch.load(run / "latest.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpoint, match="refused: it holds pickled code"):
        find_resume(run)  # refused outright, not stepped over as merely damaged
    result = CliRunner().invoke(main, ["train", "--run-dir", str(run), "--quiet"])
    assert result.exit_code == 2 and "refused" in result.output and len(result.output.strip().splitlines()) == 1
    # A pickle passed as a style is refused too (styles are safetensors: data only).
    result = CliRunner().invoke(main, ["apply", str(PHOTOS[0]), "-o", str(tmp_path / "x.jpg"),
                                       "--style", str(run / "latest.pt")])
    assert result.exit_code == 2
    assert not marker.exists()


def test_a_full_disk_stops_training_and_keeps_the_last_good_checkpoint(sample_dirs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(tiny_config(*sample_dirs, steps=4, checkpoint_every=2), run, progress=False).fit()
    before = sorted(p.name for p in run.rglob("*"))

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(fsutil.DestinationError, match="No space left on device"):
        Trainer(tiny_config(*sample_dirs, steps=8, checkpoint_every=2), run, progress=False).fit()
    monkeypatch.undo()
    path, state = find_resume(run)
    assert state["step"] == 4  # the last good one, whole
    assert not [p for p in run.rglob(".*.tmp")]  # the failed write left nothing behind
    assert {p.name for p in (run / "checkpoints").iterdir()} <= set(before)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_output_stops_apply_with_one_line(tiny_style, tmp_path, monkeypatch, code):
    src = tmp_path / "photos"
    src.mkdir()
    for p in PHOTOS[:10]:
        Image.open(p).convert("RGB").resize((48, 32)).save(src / f"{p.stem}.png")
    real_fsync = os.fsync
    writes = []

    def failing_fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(target):  # the folder, synced after a rename
            return real_fsync(fd)
        writes.append(fd)
        if PHOTOS[0].stem not in target:  # the first picture fits, then no more
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", failing_fsync)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["apply", str(src), "-o", str(out), "--style", str(tiny_style),
                                       "--engine", "torch", "--quiet"])
    assert result.exit_code == 1
    assert f"stopped: cannot write {out}" in result.output and os.strerror(code) in result.output
    assert result.output.count("stopped:") == 1  # said once, in the summary
    # It stopped, rather than failing every remaining file the same way: only the writes already under way
    # when the first failure came back (up to `ahead` = 2 queued behind it) were tried.
    assert len(writes) <= 5
    assert [p.name for p in out.iterdir()] == [f"{PHOTOS[0].stem}.png"]  # no partial file, no temporary file


# -- killed at random moments (SIGKILL: no handler runs, nothing is flushed) --------------------------------
def _last_logged_step(metrics):
    steps = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass  # the line being written when the process died
    return max(steps, default=0)


@pytest.mark.slow
def test_training_killed_at_random_moments_resumes_losing_at_most_one_interval(sample_dirs, tmp_path):
    run, every = tmp_path / "run", 4
    command = [sys.executable, "-m", "styleshift", "train", *map(str, sample_dirs), "--name", "killed",
               "--run-dir", str(run), "--steps", "10000", "--checkpoint-every", str(every), "--sample-every", "8",
               "--num-samples", "1", *TINY_CLI]
    rng = random.Random(7)
    resumed_at = 0
    for attempt in range(4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        # Let it get past the point it resumed from, then kill it at a random moment.
        while _last_logged_step(run / "metrics.jsonl") < resumed_at + every and process.poll() is None:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
        reached = _last_logged_step(run / "metrics.jsonl")

        # Every checkpoint on disk loads, and resuming goes back at most one checkpoint interval.
        for f in [run / "latest.pt", *checkpoint_files(run)]:
            assert load_resume(f)["format"] == RESUME_FORMAT
        path, state = find_resume(run)
        assert reached - every <= state["step"] <= reached + 1, (attempt, reached, state["step"])
        assert state["step"] >= resumed_at
        resumed_at = state["step"]

    # The last resume trains on to the end of a shortened schedule and leaves no temporary file.
    done = subprocess.run(command[:-1] + ["--steps", str(resumed_at + 2), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert find_resume(run)[1]["step"] == resumed_at + 2
    assert not list(run.rglob(".*.tmp"))


@pytest.mark.slow
def test_a_folder_conversion_killed_midway_finishes_on_a_rerun(tiny_style, tmp_path):
    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    for i in range(40):
        with Image.open(PHOTOS[i % len(PHOTOS)]) as im:
            im.convert("RGB").resize((192, 128)).save(src / f"photo{i:02d}.jpg")
    command = [sys.executable, "-m", "styleshift", "apply", str(src), "-o", str(out), "--style", str(tiny_style),
               "--engine", "torch", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and len([p for p in out.iterdir() if not p.name.startswith(".")]) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert 3 <= len(finished) < 40  # killed mid-way
    for p in finished:  # whatever carries a final name is a whole picture
        assert read_image(p).width == 192

    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"converted {40 - len(finished)}, skipped {len(finished)}" in rerun.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())  # no temporaries
    assert all(read_image(p).height == 128 for p in out.iterdir())


def test_a_damaged_pickle_is_stepped_over_not_mistaken_for_a_payload(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    newest = checkpoint_files(run)[0]
    (newest.parent / (newest.name + ".sha256")).unlink()  # as a checkpoint killed before its checksum was written
    # A flipped byte that turns into a reference to something that does not exist, and one that breaks a length.
    for garbage in (b"\x80\x02}q\x00(X\x06\x00\x00\x00formatq\x01ctorch\nzzz\nq\x02.", b"\x80\x02K\x01X\xff\xff"):
        newest.write_bytes(garbage)
        with pytest.warns(UserWarning, match="damaged or not a checkpoint"):
            assert find_resume(run)[1]["step"] == 6


def test_fresh_sets_the_old_checkpoints_aside_and_keeps_its_own(trained, sample_dirs, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    result = Trainer(tiny_config(*sample_dirs, name="crash", steps=2, checkpoint_every=2), run, fresh=True,
                     progress=False).fit()
    assert result.step == 2
    assert [f.name for f in checkpoint_files(run)] == ["step_00000002.pt"]
    assert (run / "latest.pt").resolve() == checkpoint_files(run)[0].resolve()
    assert find_resume(run)[1]["step"] == 2  # not the old run's step 8
    aside = run / "checkpoints.replaced" / "checkpoints"
    assert sorted(f.name for f in aside.glob("*.pt")) == ["step_00000004.pt", "step_00000006.pt", "step_00000008.pt"]
