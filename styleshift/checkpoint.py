"""Two kinds of checkpoint.

`latest.pt` resumes training: networks, optimizers, schedules, loss scalers, image pools, step and random
states, all plain types, so it loads with `torch.load(weights_only=True)` (no pickled code to trust).

`<name>.safetensors` is an exported style: both generators' weights, with the generator's config as JSON
in the file's metadata, so `Stylizer` rebuilds the network from this file alone.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import GeneratorConfig, TrainConfig, generator_from_dict
from .fsutil import atomic_open, atomic_write

RESUME_FORMAT = "styleshift-resume/1"
STYLE_FORMAT = "styleshift-style/1"
DIRECTIONS = ("forward", "inverse")  # forward: content -> style (G_AB); inverse: style -> content (G_BA)


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


def save_resume(path: str | os.PathLike, cfg: TrainConfig, step: int, model_state: dict, extra: dict | None = None):
    state = {
        "format": RESUME_FORMAT,
        "config": cfg.to_dict(),
        "step": step,
        "model": model_state,
        "rng": rng_state(),
        **(extra or {}),
    }
    with atomic_open(path) as f:
        torch.save(state, f)


def load_resume(path: str | os.PathLike) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: not a styleshift resume checkpoint")
    return state


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


def load_style(path: str | os.PathLike) -> Style:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != STYLE_FORMAT:
                raise ValueError(f"{path}: not a styleshift style (no '{STYLE_FORMAT}' metadata)")
            weights: dict[str, dict[str, torch.Tensor]] = {d: {} for d in DIRECTIONS}
            for key in f.keys():
                direction, _, name = key.partition(".")
                weights.setdefault(direction, {})[name] = f.get_tensor(key)
    except (OSError, RuntimeError) as e:  # safetensors raises these for damaged files
        raise ValueError(f"{path}: cannot read style file ({e})") from None
    return Style(
        generator=generator_from_dict(json.loads(metadata["generator"])),
        weights=weights,
        name=metadata.get("name", path.stem),
        meta=json.loads(metadata.get("meta", "{}")),
        path=path,
    )
