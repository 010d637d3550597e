import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_config
from styleshift.checkpoint import load_style
from styleshift.cyclegan import CycleGAN
from styleshift.data import UnpairedDataset, fixed_images, to_model_range
from styleshift.precision import Precision
from styleshift.trainer import ConfigMismatch, Trainer


def test_one_step_changes_all_four_networks_and_gives_finite_losses(sample_dirs):
    photos, paintings = sample_dirs
    cfg = tiny_config(photos, paintings)
    model = CycleGAN(cfg, Precision(torch.device("cpu"), "fp32"), total_steps=10, decay_start=5)
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in model.networks().items()}
    real_A = to_model_range(fixed_images(sorted(photos.iterdir()), 1, 40, 32), torch.device("cpu"))
    real_B = to_model_range(fixed_images(sorted(paintings.iterdir()), 1, 40, 32), torch.device("cpu"))
    losses = model.train_step(real_A, real_B)
    assert set(losses) == {"G_AB", "G_BA", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B"}
    assert all(math.isfinite(v.item()) for v in losses.values())
    for name, net in model.networks().items():
        changed = [not torch.equal(a, b) for a, b in zip(before[name], net.parameters())]
        assert all(changed), f"{name}: {changed.count(False)} parameter tensors did not change"


def test_identity_loss_off_skips_the_identity_terms(sample_dirs):
    cfg = tiny_config(*sample_dirs, lambda_identity=0.0, gan_mode="vanilla")
    model = CycleGAN(cfg, Precision(torch.device("cpu"), "fp32"), 10, 5)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    losses = model.train_step(x, x.flip(-1))
    assert "idt_A" not in losses and all(math.isfinite(v.item()) for v in losses.values())


def test_learning_rate_is_constant_then_decays_linearly_to_zero(sample_dirs):
    cfg = tiny_config(*sample_dirs)
    model = CycleGAN(cfg, Precision(torch.device("cpu"), "fp32"), total_steps=4, decay_start=2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    lrs = []
    for _ in range(4):
        lrs.append(model.opt_G.param_groups[0]["lr"])
        model.train_step(x, x)
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-4, 1e-4])
    assert model.opt_G.param_groups[0]["lr"] == 0.0


def test_a_short_run_writes_every_promised_file(sample_dirs, tmp_path):
    run = tmp_path / "run"
    result = Trainer(tiny_config(*sample_dirs), run, progress=False).fit()
    assert result.step == 6 and not result.interrupted

    config = json.loads((run / "config.json").read_text())
    assert config["generator"]["ngf"] == 4 and config["crop_size"] == 32

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("G_AB", "G_BA", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B", "lr", "sec_per_step", "epoch"):
        assert all(math.isfinite(r[key]) for r in lines), key

    grids = sorted((run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000003.png", "step_0000006.png"]
    from PIL import Image

    with Image.open(grids[-1]) as im:  # 3 columns (real | translated | reconstructed), 2+2 rows of 32 px
        assert im.size == (3 * 32 + 4 * 2, 4 * 32 + 5 * 2)

    state = torch.load(run / "latest.pt", weights_only=True)  # plain types only
    assert state["step"] == 6
    assert set(state["model"]["nets"]) == {"G_AB", "G_BA", "D_A", "D_B"}
    for key in ("opt_G", "opt_D", "sched_G", "sched_D", "pool_A", "pool_B"):
        assert key in state["model"]
    assert "torch" in state["rng"]

    style = load_style(run / "tiny.safetensors")
    assert style.name == "tiny" and style.generator.ngf == 4 and style.meta["step"] == 6
    assert not list(run.glob(".*.tmp"))  # no temporary files left behind


def losses_by_step(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_resume_continues_at_the_same_step_with_the_same_losses(sample_dirs, tmp_path):
    cfg = tiny_config(*sample_dirs, steps=6, checkpoint_every=100, num_workers=1)
    whole = Trainer(cfg, tmp_path / "whole", progress=False).fit()
    assert whole.step == 6

    first = Trainer(cfg, tmp_path / "split", progress=False).fit(stop_at=3)
    assert first.step == 3 and first.interrupted
    resumed = Trainer(cfg, tmp_path / "split", progress=False)
    assert resumed.step == 3
    assert resumed.fit().step == 6

    a, b = losses_by_step(tmp_path / "whole"), losses_by_step(tmp_path / "split")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in ("G_AB", "G_BA", "cycle_A", "cycle_B", "D_A", "D_B", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_resume_refuses_a_different_architecture(sample_dirs, tmp_path):
    cfg = tiny_config(*sample_dirs, steps=2)
    Trainer(cfg, tmp_path / "run", progress=False).fit(stop_at=1)
    with pytest.raises(ConfigMismatch, match="discriminator"):
        Trainer(cfg.replace(discriminator=cfg.discriminator.__class__(ndf=8)), tmp_path / "run", progress=False)
    # A longer schedule is a change a resumed run may make.
    assert Trainer(cfg.replace(steps=3), tmp_path / "run", progress=False).total_steps == 3


def test_ctrl_c_saves_and_exits_cleanly(sample_dirs, tmp_path):
    photos, paintings = sample_dirs
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "styleshift", "train", str(photos), str(paintings), "--run-dir", str(run),
           "--generator", "resnet_6blocks", "--ngf", "4", "--n-blocks", "1", "--ndf", "4", "--load-size", "40",
           "--crop-size", "32", "--steps", "100000", "--log-every", "1", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Stopped at step" in out
    state = torch.load(run / "latest.pt", weights_only=True)
    assert state["step"] >= 2
    assert (run / "paintings.safetensors").exists()  # named after the style folder


def test_augmentation_is_reproducible_for_a_seed(sample_dirs):
    photos, paintings = sample_dirs
    ds = UnpairedDataset(sorted(photos.iterdir()), sorted(paintings.iterdir()), 40, 32)
    a, b = ds[(0, 1, 1234)], ds[(0, 1, 1234)]
    assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])
    assert a["A"].shape == (3, 32, 32) and a["A"].dtype == torch.uint8
    crops = {ds[(0, 1, seed)]["A"].float().sum().item() for seed in range(8)}
    assert len(crops) > 1  # different seeds, different crops
