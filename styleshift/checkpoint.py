"""Two kinds of checkpoint.

A resume checkpoint resumes training: networks, optimizers, schedules, loss scalers, image pools, step
and random states, all plain types, so it loads with `torch.load(weights_only=True)`: a file carrying
pickled code is refused, never run. A run directory keeps the last few, each with a SHA-256 checksum in
the `sha256sum` format (so `sha256sum -c` checks them too):

    runs/NAME/checkpoints/step_00001000.pt   (+ .sha256)   the last `keep_checkpoints` of them
    runs/NAME/latest.pt                                   the newest: a symbolic link to one of them

Every file is written atomically (temporary file, fsync, rename), so a run killed at any moment leaves
each of them whole or as it was. Resuming verifies the checksum and loads; a damaged `latest.pt` is
reported and the newest good checkpoint before it used instead.

`<name>.safetensors` is an exported style: both generators' weights, with the generator's config as JSON
in the file's metadata, so `Stylizer` rebuilds the network from this file alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import GeneratorConfig, TrainConfig, generator_from_dict
from .fsutil import atomic_copy, atomic_link, atomic_open, atomic_write, atomic_write_text

RESUME_FORMAT = "styleshift-resume/1"
STYLE_FORMAT = "styleshift-style/1"
DIRECTIONS = ("forward", "inverse")  # forward: content -> style (G_AB); inverse: style -> content (G_BA)
LATEST = "latest.pt"
CHECKPOINTS = "checkpoints"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str() is one line naming the file and the reason."""


class UnsafeCheckpoint(CheckpointError):
    """A file that would run pickled code if loaded the usual way. Refused, never a fallback."""


# -- resume ------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_resume(run_dir: str | os.PathLike, cfg: TrainConfig, step: int, model_state: dict,
                extra: dict | None = None, keep: int = 3) -> Path:
    """Write the checkpoint of `step` under run_dir/checkpoints, point latest.pt at it, and keep the last
    `keep`. Each step is durable before the next begins, so a kill at any moment leaves a loadable set."""
    run_dir = Path(run_dir)
    state = {
        "format": RESUME_FORMAT,
        "config": cfg.to_dict(),
        "step": step,
        "model": model_state,
        "rng": rng_state(),
        **(extra or {}),
    }
    path = run_dir / CHECKPOINTS / f"step_{step:08d}.pt"
    with atomic_open(path) as f:
        torch.save(state, f)
    # Hashed as read back from the file, so the checksum covers what is on disk, not what was meant to be.
    digest = sha256_of(path)
    atomic_write_text(_sidecar(path), f"{digest}  {path.name}\n")
    _point_latest_at(path, run_dir / LATEST)
    _prune(run_dir, step, keep)
    return path


def _point_latest_at(path: Path, latest: Path) -> None:
    """Make latest.pt a relative symbolic link to `path`, switched in one rename, so it is never out of step
    with its checksum (the target's). Where links cannot be made (Windows without the privilege), a copy
    with its own checksum file."""
    if not atomic_link(path.relative_to(latest.parent), latest, symbolic=True):
        atomic_copy(path, latest)
        atomic_write_text(_sidecar(latest), _sidecar(path).read_text().replace(path.name, LATEST))
        return
    with contextlib.suppress(FileNotFoundError):
        _sidecar(latest).unlink()  # a copy's checksum, from an earlier run on another system


def _step_of(path: Path) -> int | None:
    m = _STEP_FILE.match(path.name)
    return int(m[1]) if m else None


def checkpoint_files(run_dir: str | os.PathLike) -> list[Path]:
    """The step checkpoints of a run directory, newest first."""
    found = [(step, p) for p in (Path(run_dir) / CHECKPOINTS).glob("step_*.pt") if (step := _step_of(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to `step`, the one just written. Any of a later step belongs to
    a timeline this run has left (it resumed from before a damaged one), so it goes too."""
    files = checkpoint_files(run_dir)
    later = [p for p in files if _step_of(p) > step]
    for old in later + files[len(later):][max(1, keep):]:
        for p in (old, _sidecar(old)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def set_aside(run_dir: str | os.PathLike) -> Path | None:
    """A run started over (--fresh) moves the checkpoints it replaces to checkpoints.replaced/ (one
    generation: an older one there is removed), so they neither mix with the new ones nor are lost at once."""
    run_dir = Path(run_dir)
    old, aside = run_dir / CHECKPOINTS, run_dir / f"{CHECKPOINTS}.replaced"
    latest = run_dir / LATEST
    if not old.is_dir() and not latest.exists():
        return None
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    if old.is_dir():
        os.replace(old, aside / CHECKPOINTS)
    if latest.is_symlink():
        latest.unlink()
    elif latest.exists():  # a copy (no links), or a run from before checkpoints/ existed
        os.replace(latest, aside / LATEST)
        with contextlib.suppress(FileNotFoundError):
            os.replace(_sidecar(latest), aside / _sidecar(latest).name)
    return aside


def load_resume(path: str | os.PathLike) -> dict:
    """Load one resume checkpoint, verifying its checksum when it has one; CheckpointError if it cannot be
    used, UnsafeCheckpoint if it carries pickled code."""
    path = Path(path)
    # latest.pt is a link: its checksum is its target's. A checkpoint killed between being renamed into
    # place and getting its checksum file has none; it is whole (fsync came first) and loads as usual.
    sidecar = _sidecar(path) if _sidecar(path).exists() else _sidecar(path.resolve())
    if sidecar.exists():
        expected = sidecar.read_text().split(maxsplit=1)[0] if sidecar.stat().st_size else ""
        if sha256_of(path) != expected:
            raise CheckpointError(f"{path}: damaged (its SHA-256 does not match {sidecar.name})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged pickle fails with almost any exception type
        message = str(e).strip()
        what = next((ln.strip() for ln in message.splitlines() if "Unsupported global" in ln), "")
        if isinstance(e, pickle.UnpicklingError) and _names_real_code(what):
            # weights_only refuses any global it does not know, which is what a payload needs to run. A file
            # merely damaged fails otherwise (or names a global that does not exist), and is stepped over.
            raise UnsafeCheckpoint(f"{path}: refused: it holds pickled code or objects, which styleshift never "
                                   f"loads ({what[:160]})") from None
        reason = (message.splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({type(e).__name__}: {reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: not a styleshift resume checkpoint")
    return state


def _names_real_code(refusal: str) -> bool:
    """Whether torch's "Unsupported global: GLOBAL module.name" names something that exists (looked up among
    the modules already imported; nothing is imported to find out): a payload, not a flipped byte."""
    m = re.search(r"GLOBAL ([\w.]+)", refusal)
    if not m:
        return False
    module, _, name = m[1].rpartition(".")
    module = module or "builtins"  # torch names builtins without their module: "GLOBAL exec"
    return module in sys.modules and hasattr(sys.modules[module], name)


def find_resume(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest good checkpoint of a run: latest.pt, else the step checkpoints newest first, with a
    warning naming what was damaged. None when the run has none; CheckpointError when none is good."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST
    candidates = ([latest] if latest.exists() else []) + checkpoint_files(run_dir)
    problems = [f"{latest}: a link to a missing file"] if latest.is_symlink() and not latest.exists() else []
    for path in candidates:
        try:
            state = load_resume(path)
        except UnsafeCheckpoint:
            raise
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)}; resuming from {path} (step {state['step']})", stacklevel=2)
        return path, state
    if problems:
        raise CheckpointError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}; "
                              "--fresh starts over")
    return None


# -- exported styles ---------------------------------------------------------------------------------------
@dataclass
class Style:
    """An exported style: the generator config and weights of both directions."""

    generator: GeneratorConfig
    weights: dict[str, dict[str, torch.Tensor]]  # direction -> state dict
    name: str = "style"
    meta: dict[str, Any] = field(default_factory=dict)  # step, source folders, ...
    path: Path | None = None

    def build(self, direction: str = "forward") -> nn.Module:
        """The generator for `direction`, rebuilt from the stored config, weights loaded, in eval mode."""
        from .networks import build_generator

        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
        net = build_generator(self.generator)
        net.load_state_dict(self.weights[direction])
        return net.eval().requires_grad_(False)


def export_style(path: str | os.PathLike, name: str, generator: GeneratorConfig, nets: dict[str, nn.Module],
                 meta: dict[str, Any] | None = None) -> None:
    """Write both generators (`nets` maps direction -> module) to one .safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {
        f"{direction}.{key}": value.detach().cpu().contiguous()
        for direction, net in nets.items()
        for key, value in net.state_dict().items()
    }
    metadata = {
        "format": STYLE_FORMAT,
        "name": name,
        "generator": json.dumps(asdict(generator), sort_keys=True),
        "meta": json.dumps(meta or {}, sort_keys=True),
    }
    blob = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(blob))


def load_style(path: str | os.PathLike, directions: tuple[str, ...] = DIRECTIONS) -> Style:
    """A style file's config, metadata and the weights of `directions` (a Stylizer reads only its own)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != STYLE_FORMAT:
                raise ValueError(f"{path}: not a styleshift style (no '{STYLE_FORMAT}' metadata)")
            weights: dict[str, dict[str, torch.Tensor]] = {d: {} for d in directions}
            for key in f.keys():
                direction, _, name = key.partition(".")
                if direction in directions:
                    weights[direction][name] = f.get_tensor(key)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises OSError, RuntimeError or its own SafetensorError
        raise ValueError(f"{path}: not a style file, or a damaged one ({e})") from None
    return Style(
        generator=generator_from_dict(json.loads(metadata["generator"])),
        weights=weights,
        name=metadata.get("name", path.stem),
        meta=json.loads(metadata.get("meta", "{}")),
        path=path,
    )
