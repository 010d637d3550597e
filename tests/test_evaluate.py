"""`styleshift eval` and `train --eval-every`: measuring a style on real images, offline."""

import json
import shutil

from click.testing import CliRunner

from conftest import tiny_config
from styleshift.checkpoint import load_resume
from styleshift.cli import main
from styleshift.evaluate import spread
from styleshift.trainer import Trainer


def test_eval_prints_a_table_and_writes_json_for_both_directions(sample_dirs, tiny_style, tmp_path):
    photos, paintings = sample_dirs
    out = tmp_path / "result.json"
    args = ["eval", str(photos), str(paintings), "--style", str(tiny_style), "--size", "32", "--both", "--json",
            str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "photos vs paintings" in result.output and "G(photos) vs paintings" in result.output
    assert "F(paintings) vs photos" in result.output and "PSNR" in result.output
    data = json.loads(out.read_text())
    assert data["size"] == 32 and data["style"] == "tiny"
    for direction, (n_source, n_target) in (("forward", (4, 5)), ("inverse", (5, 4))):
        r = data[direction]
        assert (r["source_images"], r["target_images"]) == (n_source, n_target)
        assert r["swd"]["resolutions"] == [32, 16] and len(r["swd_baseline"]["levels"]) == 2
        assert r["swd"]["mean"] > 0 and r["swd"]["mean"] != r["swd_baseline"]["mean"]
        assert 0 < r["cycle_psnr"] < 60 and -1 <= r["cycle_ssim"] <= 1
    # The same command again gives the same numbers: every random draw is seeded.
    CliRunner().invoke(main, args)
    assert json.loads(out.read_text())["forward"] == data["forward"]


def test_eval_of_a_run_writes_into_the_run_and_refreshes_its_report(sample_dirs, tiny_style, tmp_path):
    run = shutil.copytree(tiny_style.parent, tmp_path / "run")
    assert (run / "report.html").exists()  # training wrote it
    result = CliRunner().invoke(main, ["eval", *map(str, sample_dirs), "--style", str(run), "--size", "32",
                                       "--limit", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "eval.json").read_text())
    assert data["forward"]["source_images"] == 3 and data["forward"]["target_images"] == 3
    assert "Evaluation (styleshift eval)" in (run / "report.html").read_text()


def test_eval_errors_are_one_clear_line(sample_dirs, tiny_style, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a picture")
    result = CliRunner().invoke(main, ["eval", str(empty), str(sample_dirs[1]), "--style", str(tiny_style)])
    assert result.exit_code == 2 and "no usable image" in result.output and str(empty) in result.output
    result = CliRunner().invoke(main, ["eval", *map(str, sample_dirs), "--style", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not found" in result.output


def test_training_evaluates_on_held_aside_photos_and_keeps_them_aside_when_resumed(sample_dirs, tmp_path):
    cfg = tiny_config(*sample_dirs, steps=4, eval_every=2, checkpoint_every=100)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    held = trainer.held_A
    assert len(held) == 1 and held[0] not in trainer.files_A and len(trainer.files_A) == 3
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_swd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_held_aside"] and r["eval_images"] == 1 and len(r["eval_swd_levels"]) == 2 for r in evals)
    assert evals[0]["eval_swd_baseline"] == evals[1]["eval_swd_baseline"]  # the same photos, the same draws
    assert load_resume(tmp_path / "run" / "latest.pt")["held_aside"] == [held[0].name]

    # Resumed, even without --eval-every, the run trains on the same photos.
    resumed = Trainer(cfg.replace(steps=6, eval_every=0), tmp_path / "run", progress=False)
    assert resumed.held_A == held and resumed.files_A == trainer.files_A


def test_spread_takes_evenly_spaced_items():
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread([1, 2], 5) == [1, 2] and spread([1, 2], None) == [1, 2]
