"""Measuring a style offline: the library behind `styleshift eval` and `train --eval-every`.

A style works when its translated photos are closer to the paintings than the photos were: SWD(G(photos),
paintings) well below the baseline SWD(photos, paintings) (see styleshift.metrics), while the cycle F(G(x))
still gives back x (PSNR / SSIM). Every image is first brought to one size, its shorter side scaled to `size`
and the central square kept, so sets of any picture sizes compare level by level.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import centre_crop, find_training_images, fixed_images, read_training_image, to_model_range
from .fsutil import atomic_write_text
from .images import ImageError
from .metrics import SlicedWasserstein, cycle_scores

HELD_ASIDE_MAX = 8  # photos kept out of training for `--eval-every`
STYLE_SAMPLE_MAX = 32  # paintings that `--eval-every` compares with
Translate = Callable[[torch.Tensor], torch.Tensor]  # N x 3 x H x W in [-1, 1] -> the same


def spread(items: list, count: int | None) -> list:
    """`count` items evenly spread over the (sorted) list: a sample that is not just its first files."""
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def load_images(folder: str | os.PathLike, size: int, limit: int | None = None, role: str = "image",
                progress: bool = False) -> torch.Tensor:
    """The pictures under `folder` (at most `limit`, evenly spread) as N x 3 x size x size uint8 centre crops.
    Files that are not pictures are skipped with one warning each."""
    from tqdm.auto import tqdm

    files = spread(find_training_images(folder, role), limit)
    prepare = centre_crop(size, size)
    images = []
    for path in tqdm(files, desc=f"reading {Path(folder).name}", unit="img", disable=not progress, leave=False):
        try:
            image = prepare(image=read_training_image(path))["image"]
        except ImageError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        images.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
    return torch.stack(images)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, rounded as a written picture is."""
    return x.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


@torch.inference_mode()
def translate_with_cycle(forward: Translate, backward: Translate, images: torch.Tensor, device: torch.device,
                         batch_size: int = 8, progress: bool = False, autocast=contextlib.nullcontext):
    """G(x) for every image (uint8, on the CPU), and the PSNR and SSIM of F(G(x)) against x for each.
    `autocast` is entered around the networks only: the scores are computed in fp32."""
    from tqdm.auto import tqdm

    fakes, psnrs, ssims = [], [], []
    with tqdm(total=len(images), desc="translating", unit="img", disable=not progress, leave=False) as bar:
        for batch in images.split(batch_size):
            real = to_model_range(batch, device)
            with autocast():
                fake = forward(real).float()
                rec = backward(fake).float()
            fakes.append(to_uint8(fake).cpu())
            p, s = cycle_scores(real.add(1).div(2), rec.add(1).div(2))
            psnrs += p
            ssims += s
            bar.update(len(batch))
    return torch.cat(fakes), psnrs, ssims


def measure_direction(forward: Translate, backward: Translate, source: torch.Tensor, target: torch.Tensor,
                      device: torch.device, seed: int = 0, normalize: str = "target", batch_size: int = 8,
                      progress: bool = False) -> dict:
    """Baseline SWD(source, target), SWD(G(source), target) and the cycle scores of G then F on source."""
    swd = SlicedWasserstein(target, seed, normalize, device=device)
    baseline = swd.distance(source)
    fakes, psnrs, ssims = translate_with_cycle(forward, backward, source, device, batch_size, progress)
    return {"source_images": len(source), "target_images": len(target), "swd_baseline": baseline.to_dict(),
            "swd": swd.distance(fakes).to_dict(), "cycle_psnr": round(float(np.mean(psnrs)), 3),
            "cycle_ssim": round(float(np.mean(ssims)), 4)}


def evaluate(style, photos: str | os.PathLike, paintings: str | os.PathLike, size: int = 256, both: bool = False,
             limit: int | None = None, seed: int = 0, normalize: str = "target", device: str = "auto",
             precision: str = "auto", batch_size: int = 8, progress: bool = False) -> dict:
    """Measure `style` (as `--style`: a style name, file, run directory or run name; None, the shipped default
    style; or a loaded Style) on two folders.

    Returns a JSON-ready dict: the settings, and per direction ("forward": photos -> paintings, and with
    `both` "inverse": paintings -> photos) the image counts, SWD baseline and translated (x 10^3 per level
    and mean) and the cycle PSNR / SSIM.
    """
    from .checkpoint import Style, load_style
    from .styles import find_style
    from .stylizer import Stylizer

    style = style if isinstance(style, Style) else load_style(find_style(style))
    nets = {d: Stylizer(style, direction=d, device=device, precision=precision) for d in ("forward", "inverse")}
    sets = {"photos": load_images(photos, size, limit, "photos", progress),
            "paintings": load_images(paintings, size, limit, "paintings", progress)}
    result = {"style": style.name, "style_file": str(style.path) if style.path else None,
              "step": style.meta.get("step"), "photos": str(photos), "paintings": str(paintings),
              "size": size, "seed": seed, "normalize": normalize}
    plans = [("forward", "photos", "paintings")] + ([("inverse", "paintings", "photos")] if both else [])
    for direction, source, target in plans:
        back = "inverse" if direction == "forward" else "forward"
        result[direction] = measure_direction(
            nets[direction].stylize_tensor, nets[back].stylize_tensor, sets[source], sets[target],
            nets[direction].device, seed, normalize, batch_size, progress)
    return result


def write_json(path: str | os.PathLike, result: dict) -> None:
    import json

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def format_table(result: dict) -> str:
    """The result of `evaluate` as a small text table."""
    lines = [f"style {result['style']}" + (f" (step {result['step']})" if result.get("step") is not None else "")
             + f", {result['size']} px centre crops, seed {result['seed']}, {result['normalize']} normalisation"]
    names = {"forward": ("photos", "paintings", "G"), "inverse": ("paintings", "photos", "F")}
    for direction in ("forward", "inverse"):
        if direction not in result:
            continue
        r = result[direction]
        source, target, net = names[direction]
        rows = [(f"{source} vs {target}", r["swd_baseline"]), (f"{net}({source}) vs {target}", r["swd"])]
        levels = [f"{s}px" for s in r["swd"]["resolutions"]]
        levels[-1] += "*"
        width = max(len(label) for label, _ in rows) + 2
        lines += ["", f"{direction}: {source} -> {target} ({r['source_images']} {source}, "
                      f"{r['target_images']} {target})",
                  f"{'SWD x1e3':<{width}}" + "".join(f"{h:>9}" for h in levels) + f"{'mean':>9}"]
        lines += [f"{label:<{width}}" + "".join(f"{v:>9.1f}" for v in swd["levels"]) + f"{swd['mean']:>9.1f}"
                  for label, swd in rows]
        back = "F" if net == "G" else "G"
        lines.append(f"cycle {back}({net}(x)) vs x: PSNR {r['cycle_psnr']:.2f} dB, SSIM {r['cycle_ssim']:.3f}")
    lines.append("(* the low-pass residual; lower SWD is closer to the target set)")
    return "\n".join(lines)


# -- during training ------------------------------------------------------------------------------------------
def held_aside(files: list[Path], root: str | os.PathLike, eval_every: int, resume_state: dict | None) -> list[Path]:
    """Photos kept out of training so that `--eval-every` measures pictures the generator never saw.

    A fresh run with evaluation holds aside every k-th photo of the sorted list (at most 8, at most a
    quarter of them); a resumed run keeps the choice saved in its checkpoint, so its training set never
    changes. The rest is sampled as usual, deterministically.
    """
    if resume_state is not None:
        names = set(resume_state.get("held_aside", []))
        return [f for f in files if relative_name(f, root) in names]
    return spread(files, min(HELD_ASIDE_MAX, len(files) // 4)) if eval_every > 0 else []


def relative_name(path: Path, root: str | os.PathLike) -> str:
    return path.relative_to(root).as_posix()


class TrainingEval:
    """What `train --eval-every K` logs: SWD(G(photos), paintings) against the baseline SWD(photos, paintings),
    and the cycle PSNR / SSIM of those photos, at the training crop size. The paintings are a fixed sample
    of the style folder (the style is defined by it); their descriptors are computed once."""

    def __init__(self, photos: list[Path], paintings: list[Path], load_size: int, crop_size: int, seed: int = 0,
                 held_aside: bool = True) -> None:
        self.photos = fixed_images(photos, len(photos), load_size, crop_size)
        style = fixed_images(spread(paintings, STYLE_SAMPLE_MAX), STYLE_SAMPLE_MAX, load_size, crop_size)
        self.swd = SlicedWasserstein(style, seed)
        self.baseline = self.swd.distance(self.photos)
        self.held_aside = held_aside

    def __call__(self, forward: Translate, backward: Translate, device: torch.device,
                 autocast=contextlib.nullcontext) -> dict:
        fakes, psnrs, ssims = translate_with_cycle(forward, backward, self.photos, device, autocast=autocast)
        swd = self.swd.distance(fakes)
        return {"eval_swd": round(swd.mean, 3), "eval_swd_levels": [round(v, 3) for v in swd.levels],
                "eval_swd_baseline": round(self.baseline.mean, 3), "eval_cycle_psnr": round(float(np.mean(psnrs)), 3),
                "eval_cycle_ssim": round(float(np.mean(ssims)), 4), "eval_images": len(self.photos),
                "eval_held_aside": self.held_aside}
