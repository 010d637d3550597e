"""DistributedDataParallel training and sharded conversion, run for real: two CPU processes joined with gloo,
spawned by the test with the environment torchrun would give them."""

import faulthandler
import json
import os
import socket
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PHOTOS, tiny_config

WORLD = 2


# -- running a function in WORLD processes -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank, port, fn, args):
    faulthandler.enable(all_threads=True)  # a crash in a worker prints where each thread was
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    from styleshift import distributed as dist

    try:
        fn(rank, *args)
    finally:
        dist.close()
    # Every scenario has saved what the tests check. Leave as `styleshift` itself leaves a torchrun job, without
    # the interpreter's teardown (styleshift.distributed.leave says why): in about 1 job in 30 a worker aborted
    # there ("terminate called without an active exception"), failing every test of the job.
    dist.leave(0)


def run_processes(fn, *args, timeout=240):
    """fn(rank, *args) in WORLD processes; a hang fails the test instead of blocking the suite."""
    job = torch.multiprocessing.start_processes(_process, args=(free_port(), fn, args), nprocs=WORLD, join=False,
                                                start_method="spawn")
    deadline = time.monotonic() + timeout
    while not job.join(timeout=1):
        if time.monotonic() > deadline:
            for p in job.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: the processes did not finish in {timeout} s")


def metrics(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def networks(trainer, what="weights"):
    """Each network's parameters (what="weights"), or their gradients from the last step (what="grads")."""
    from styleshift.cyclegan import unwrap

    pick = (lambda p: p.detach().clone()) if what == "weights" else (lambda p: p.grad.clone())
    return {name: {key: pick(p) for key, p in unwrap(net).named_parameters()}
            for name, net in trainer.model.networks().items()}


# -- one distributed job runs every scenario (starting processes is the slow part) ----------------------------
def _job(rank, cfg, style, photos, tmp):
    train_and_record(rank, cfg.replace(steps=4), tmp)
    stop_and_resume(rank, cfg.replace(steps=6, pool_size=2), tmp)
    launch_mismatched(rank, cfg, tmp)
    convert_a_folder(rank, style, photos, tmp)
    apply_from_the_command_line(rank, style, photos, tmp)  # last: the command leaves the process group


@pytest.fixture(scope="module")
def ddp(sample_dirs, tiny_style, tmp_path_factory):
    """The folder holding what each scenario of a 2-process job recorded."""
    tmp = tmp_path_factory.mktemp("ddp")
    photos = ten_photos_and_a_broken_file(tmp / "photos")
    run_processes(_job, tiny_config(*sample_dirs, checkpoint_every=100), tiny_style, photos, tmp)
    return tmp


# -- training ------------------------------------------------------------------------------------------------
def train_and_record(rank, cfg, tmp):
    """A 1-step run (its gradients), then a run of cfg.steps (its weights and metrics)."""
    from styleshift.trainer import Trainer

    one = Trainer(cfg.replace(steps=1), tmp / f"one_{cfg.batch_size}", progress=False)
    one.fit()
    torch.save(networks(one, "grads"), tmp / f"grads_{cfg.batch_size}_{rank}.pt")
    trainer = Trainer(cfg, tmp / f"run_{cfg.batch_size}", progress=False)
    trainer.fit()
    torch.save(networks(trainer), tmp / f"weights_{cfg.batch_size}_{rank}.pt")


def test_ddp_keeps_the_four_networks_identical_and_averages_gradients(ddp, sample_dirs):
    weights = [torch.load(ddp / f"weights_1_{rank}.pt") for rank in range(WORLD)]
    assert set(weights[0]) == {"G_AB", "G_BA", "D_A", "D_B"}
    for name in weights[0]:
        for key, value in weights[0][name].items():
            assert torch.equal(value, weights[1][name][key]), f"{name}.{key} differs between the ranks"

    # Rank 0 alone wrote the run directory: one metrics line per step, not one per process.
    assert sorted(metrics(ddp / "run_1")) == [1, 2, 3, 4]
    saved = torch.load(ddp / "run_1" / "latest.pt", weights_only=True)
    assert saved["step"] == 4 and torch.equal(saved["model"]["nets"]["D_B"]["model.0.weight"],
                                              weights[1]["D_B"]["model.0.weight"])

    # Averaged gradients: 2 processes x batch 1 train as 1 process x batch 2 on the same images (the
    # sampler gives rank r the global positions r, r + 2, ...; instance norm keeps samples independent).
    train_and_record(0, tiny_config(*sample_dirs, checkpoint_every=100, steps=4, batch_size=2), ddp)
    single, averaged = torch.load(ddp / "grads_2_0.pt"), torch.load(ddp / "grads_1_1.pt")
    for name in single:
        # Rounding noise only (biases followed by instance norm get gradients of pure noise, ~1e-7 of the
        # largest); a sum instead of a mean would be off by a factor 2.
        scale = max(grad.abs().max() for grad in single[name].values())
        for key, grad in single[name].items():
            torch.testing.assert_close(averaged[name][key], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{name}.{key}")
    a, b = metrics(ddp / "run_1"), metrics(ddp / "run_2")
    for step in a:
        for key in ("G_AB", "G_BA", "cycle_A", "cycle_B", "idt_A", "D_A", "D_B"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)


def stop_and_resume(rank, cfg, tmp):
    from styleshift.trainer import Trainer

    Trainer(cfg, tmp / "whole", progress=False).fit()
    first = Trainer(cfg, tmp / "split", progress=False).fit(stop_at=3)
    resumed = Trainer(cfg, tmp / "split", progress=False)
    steps = [first.step, first.interrupted, resumed.step]
    steps.append(resumed.fit().step)
    torch.save(steps, tmp / f"steps_{rank}.pt")


def test_a_ddp_run_stopped_and_resumed_continues_as_if_uninterrupted(ddp):
    for rank in range(WORLD):
        assert torch.load(ddp / f"steps_{rank}.pt") == [3, True, 3, 6]
    # The run has a pool of 2, full after two steps, so later steps draw from each rank's own pool: a rank
    # that resumed without its pool (or with rank 0's) would log other losses.
    saved = torch.load(ddp / "split" / "latest.pt", weights_only=True)
    assert set(saved["other_ranks"]) == {1} and len(saved["other_ranks"][1]["pool_A"]["images"]) == 2

    a, b = metrics(ddp / "whole"), metrics(ddp / "split")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in ("G_AB", "G_BA", "cycle_A", "cycle_B", "D_A", "D_B", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)


def launch_mismatched(rank, cfg, tmp):
    from styleshift.trainer import ConfigMismatch, Trainer

    try:
        Trainer(cfg.replace(lr=cfg.lr * (1 + rank)), tmp / "mismatched", progress=False)
        error = None
    except ConfigMismatch as e:
        error = str(e)
    torch.save(error, tmp / f"mismatch_{rank}.pt")


def test_ranks_launched_with_different_settings_are_refused_on_every_rank(ddp):
    for rank in range(WORLD):
        assert torch.load(ddp / f"mismatch_{rank}.pt") == "rank 1 was launched with other settings than rank 0 (lr)"


# -- sharded conversion --------------------------------------------------------------------------------------
def convert_a_folder(rank, style, photos, tmp):
    from styleshift import apply as apply_module
    from styleshift import distributed as dist
    from styleshift.stylizer import Stylizer

    written = []
    write_image = apply_module.write_image

    def recording_write(path, *args, **kwargs):
        written.append(str(path))
        return write_image(path, *args, **kwargs)

    apply_module.write_image = recording_write
    stylizer = Stylizer(style, device="cpu", precision="fp32")
    jobs = apply_module.plan(photos, tmp / "out", stylizer.name)
    summary = apply_module.convert_shared(jobs, stylizer.stylize_picture, dist.context(), progress=False)
    torch.save({"written": written, "summary": (summary.converted, summary.skipped, summary.failed)},
               tmp / f"convert_{rank}.pt")


def ten_photos_and_a_broken_file(folder):
    for i, source in enumerate(PHOTOS[:10]):
        path = folder / f"set{i % 3}" / f"photo{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as im:
            im.convert("RGB").resize((48, 36)).save(path)
    (folder / "set0" / "broken.jpg").write_bytes(b"not a picture")
    return folder


def test_sharded_conversion_writes_each_output_once_and_gathers_the_summary(ddp):
    results = [torch.load(ddp / f"convert_{rank}.pt") for rank in range(WORLD)]
    written = [set(r["written"]) for r in results]
    assert all(len(w) == len(r["written"]) for w, r in zip(written, results)), "a process wrote a file twice"
    assert not written[0] & written[1], "both processes wrote the same output"
    src, out = ddp / "photos", ddp / "out"
    expected = {str(out / p.relative_to(src)) for p in src.rglob("photo*.jpg")}
    assert written[0] | written[1] == expected and len(expected) == 10
    assert all(len(w) == 5 for w in written)  # the work is shared evenly
    for r in results:  # every process knows the whole outcome, the broken file included
        converted, skipped, failed = r["summary"]
        assert (converted, skipped) == (10, 0)
        assert [path for path, _ in failed] == [str(src / "set0" / "broken.jpg")]


def apply_from_the_command_line(rank, style, photos, tmp):
    import contextlib
    import io

    from styleshift.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(["apply", str(photos), "-o", str(tmp / "cli_out"), "--style", str(style), "--device", "cpu",
                  "--quiet"], standalone_mode=False)
            code = 0
        except SystemExit as e:
            code = e.code
    torch.save((code, out.getvalue()), tmp / f"cli_{rank}.pt")


def test_apply_under_torchrun_prints_one_summary_and_fails_on_every_rank(ddp):
    (code_0, out_0), (code_1, out_1) = [torch.load(ddp / f"cli_{rank}.pt") for rank in range(WORLD)]
    assert "converted 10, skipped 0 (already there), failed 1" in out_0 and "converted" not in out_1
    assert code_0 == code_1 == 1  # the broken file, wherever it was, fails the job
    assert len(list((ddp / "cli_out").rglob("*.jpg"))) == 10


# -- the command line ------------------------------------------------------------------------------------------
def test_gpus_relaunches_the_same_command_under_torchrun(sample_dirs, tmp_path, monkeypatch):
    from styleshift import distributed as dist
    from styleshift.cli import main

    photos, paintings = sample_dirs
    launched = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "launch", lambda n, args: launched.append((n, args)) or 0)
    args = ["train", str(photos), str(paintings), "--name", "x", "--fresh", "--gpus", "2", "--steps", "3",
            "--lr", "0.001", "--no-flip", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert launched == [(2, ["train", str(photos), str(paintings), "--name", "x", "--fresh", "--steps", "3",
                             "--no-flip", "--lr", "0.001", "--quiet"])]


def test_a_torchrun_job_of_the_real_command_exits_cleanly_with_its_output(tiny_style, tmp_path):
    """`torchrun ... -m styleshift apply`: every process converts its share and leaves as soon as the command is
    done (styleshift.distributed.leave); what rank 0 printed to a pipe still arrives, once."""
    import shutil
    import subprocess

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in PHOTOS[:3]:
        shutil.copy(f, photos / f.name)
    # Each worker (torchrun gives them RANK) marks its interpreter's teardown, which it must now skip.
    site, marks = tmp_path / "site", tmp_path / "teardowns"
    site.mkdir()
    marks.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if 'RANK' in os.environ:\n"
        f"    atexit.register(lambda: open(os.path.join({str(marks)!r}, str(os.getpid())), 'w').close())\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               "-m", "styleshift", "apply", str(photos), "-o", str(tmp_path / "out"), "--style", str(tiny_style),
               "--device", "cpu", "--quiet"]
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    job = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("converted 3, skipped 0 (already there), failed 0") == 1, job.stdout + job.stderr
    assert len(list((tmp_path / "out").glob("*.jpg"))) == 3
    assert list(marks.iterdir()) == []  # both left without teardown

    # leave() itself flushes what print() left in a pipe's buffer
    code = "from styleshift import distributed; print('saved at step 7'); distributed.leave(3)"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=buffered)
    assert out.returncode == 3 and out.stdout == "saved at step 7\n"


def test_leaving_a_torchrun_job_keeps_the_command_s_exit_status(tmp_path, monkeypatch, capsys):
    from styleshift import cli
    from styleshift import distributed as dist

    class Left(Exception):
        pass

    codes = []

    def exit_now(code):
        codes.append(code)
        raise Left

    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(dist, "_joined", True)
    for argv, code in ((["apply", str(tmp_path / "missing.jpg")], 2), (["--version"], 0)):
        monkeypatch.setattr(sys, "argv", ["styleshift", *argv])
        with pytest.raises(Left):
            cli.run()
        assert codes[-1] == code
    assert "missing.jpg" in capsys.readouterr().err

    def crash(**kwargs):
        raise FloatingPointError("the losses are NaN")

    monkeypatch.setattr(cli, "main", crash)  # an error no command turns into an exit status: still leaves
    with pytest.raises(Left):
        cli.run()
    assert codes[-1] == 1 and "FloatingPointError: the losses are NaN" in capsys.readouterr().err
    monkeypatch.setattr(dist, "_joined", False)  # a process on its own exits as usual
    with pytest.raises(FloatingPointError):
        cli.run()
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["styleshift", "--version"])
    with pytest.raises(SystemExit) as e:
        cli.run()
    assert e.value.code == 0 and len(codes) == 3


def test_gpus_without_the_gpus_is_a_clear_error(sample_dirs, monkeypatch):
    from styleshift.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = CliRunner().invoke(main, ["train", *map(str, sample_dirs), "--gpus", "2"])
    assert result.exit_code == 2 and "0 CUDA GPU" in result.output and "torchrun" in result.output
