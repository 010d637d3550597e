"""Finding a style from what a user types after --style: a .safetensors file, a run directory, or a run name."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUNS_DIR = "runs"


class StyleNotFound(ValueError):
    pass


def runs_dir() -> Path:
    return Path(os.environ.get("STYLESHIFT_RUNS", DEFAULT_RUNS_DIR))


def style_file_in(run_dir: Path) -> Path | None:
    """The exported style of a run directory: <name>.safetensors (the newest, if several)."""
    files = sorted(run_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def find_style(spec: str | os.PathLike | None, runs: Path | None = None) -> Path:
    """Resolve `spec` to a .safetensors file. With no spec, the most recently trained style under `runs`."""
    runs = runs if runs is not None else runs_dir()
    if spec is None:
        candidates = [f for d in sorted(runs.glob("*/")) if (f := style_file_in(d))]
        if not candidates:
            raise StyleNotFound(f"no trained style under {runs}/: train one with 'styleshift train', or pass --style")
        return max(candidates, key=lambda p: p.stat().st_mtime)
    path = Path(spec)
    if path.is_file():
        return path
    for run_dir in (path, runs / str(spec)):
        if run_dir.is_dir():
            found = style_file_in(run_dir)
            if found:
                return found
            raise StyleNotFound(f"{run_dir}: no exported style (*.safetensors) yet; it is written at each checkpoint")
    names = sorted(d.name for d in runs.glob("*/") if style_file_in(d)) if runs.is_dir() else []
    known = f"; styles under {runs}/: {', '.join(names)}" if names else ""
    raise StyleNotFound(f"style {str(spec)!r} not found (not a file, a run directory or a run name){known}")


def find_run(spec: str | os.PathLike | None, runs: Path | None = None) -> Path:
    """Resolve `spec` to a run directory (one holding config.json): a path, or a run name under `runs`.
    With no spec, the run trained most recently."""
    runs = runs if runs is not None else runs_dir()
    if spec is None:
        found = sorted(runs.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
        if not found:
            raise StyleNotFound(f"no run under {runs}/: train one with 'styleshift train', or name a run directory")
        return found[-1].parent
    for run_dir in (Path(spec), runs / str(spec)):
        if (run_dir / "config.json").is_file():
            return run_dir
    raise StyleNotFound(f"run {str(spec)!r} not found (not a run directory, nor a run name under {runs}/)")
