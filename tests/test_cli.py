import subprocess
import sys

from click.testing import CliRunner

from conftest import SAMPLE, TINY_CLI
from styleshift.cli import main


def test_help_does_not_import_torch():
    # --help must answer at once: torch takes seconds to import.
    code = "import sys; from styleshift.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    # the whole program, as its console script runs it: nor on its way out
    code = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules)); "
            "sys.argv = ['styleshift', '--help']; from styleshift.cli import run; run()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage" in out and out.split()[-1] == "False"
    for args in (["--help"], ["train", "--help"], ["apply", "--help"], ["styles", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_train_from_the_command_line_then_resume_with_only_the_name(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLESHIFT_RUNS", str(tmp_path / "runs"))
    args = ["train", str(SAMPLE / "photos"), str(SAMPLE / "paintings"), "--name", "cli", "--steps", "2", *TINY_CLI]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "cli"
    assert (run / "cli.safetensors").exists() and (run / "latest.pt").exists()

    # Extend the finished run by two steps: the folders and the architecture come from the checkpoint.
    result = CliRunner().invoke(main, ["train", "--name", "cli", "--steps", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [line for line in (run / "metrics.jsonl").read_text().splitlines()][-1].startswith('{"step": 4')

    # Or by its directory alone.
    result = CliRunner().invoke(main, ["train", "--run-dir", str(run), "--steps", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.jsonl").read_text().splitlines()[-1].startswith('{"step": 5')

    result = CliRunner().invoke(main, ["train", "--name", "cli", "--ngf", "8", "--quiet"])
    assert result.exit_code == 2 and "--fresh" in result.output


def test_missing_folders_are_clear_errors(tmp_path):
    result = CliRunner().invoke(main, ["train", str(tmp_path / "nope"), str(tmp_path), "--name", "x",
                                       "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "nope" in result.output and "not found" in result.output
