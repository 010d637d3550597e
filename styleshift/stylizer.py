"""Stylizer: apply a trained style to pictures of any size (the library class behind `styleshift apply`)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Style, load_style
from .colour import blend, preserve_colour
from .engine import (ENGINES, OnnxNet, cached_onnx, faster_engine, min_side, onnx_available, pad_to_multiple,
                     require_onnx)
from .heap import hand_back, keep_freed_memory, return_freed_memory
from .images import Picture
from .kernels import accelerate, fold_narrow
from .precision import Precision, resolve_device
from .tiling import (Pixelwise, Plan, available_memory, choose_tile_size, make_plan, pixelwise, tiled_forward,
                     whole_picture_limit, working_memory)


# A whole forward's peak working memory while it keeps freed memory, in multiples of the tiling plan's
# estimate: heap fragmentation makes it vary from run to run (ResNet-9 at 1024 x 1024 in bf16: up to 2.2x,
# against 1.2x when freed memory goes straight back).
KEPT_PEAK = 2.25


class Stylizer:
    """Load a style once, then stylize many images.

    >>> s = Stylizer("impressionism")               # a style name, a .safetensors file, a run directory or name
    >>> out = s.stylize(pixels)                     # H x W x 3 uint8 (or uint16) -> same shape and dtype
    """

    def __init__(self, style: str | os.PathLike | Style | None = None, direction: str = "forward", device: str = "auto",
                 precision: str = "auto", engine: str = "torch", strength: float = 1.0,
                 preserve_color: bool = False, tile_size: int | None = None) -> None:
        """engine: "torch"; "onnx", onnxruntime on the CPU (see styleshift.engine: fp32, whole pictures,
        needs the [onnx] extra); or "auto", onnx where it is installed, the device is the CPU and a short
        timing of both engines (once per Stylizer, on first use) finds it faster, else torch.
        strength (0..1) and preserve_color: see styleshift.colour.
        tile_size: see below.
        style: as `--style` (see styleshift.styles); None is the default style shipped with styleshift."""
        from_file = not isinstance(style, Style)  # then its weights may be read again from it: see `style`
        if from_file:
            from .styles import find_style

            # an absolute path, to read it again from any working directory; only this direction's weights
            style = load_style(Path(os.path.abspath(find_style(style))), directions=(direction,))
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength {strength} is outside 0..1")
        self.direction = direction
        # onnxruntime runs on the CPU here, so "auto" means the CPU for it.
        self.device = resolve_device("cpu" if engine == "onnx" and device == "auto" else device)
        if engine == "onnx":
            require_onnx()
            if self.device.type != "cpu":
                raise ValueError(f"the onnx engine runs on the CPU, not {self.device.type}; use --device cpu "
                                 "or --engine torch")
        self.engine, self.strength, self.preserve_color = engine, strength, preserve_color
        self.precision = Precision.resolve(precision, self.device)
        self.net = style.build(direction).to(self.device)
        # Only this direction's fp32 weights stay (exporting to ONNX and its cache key need them), not both:
        # on the CPU, the tensors just loaded into the network, so an fp32 network shares them rather than
        # holding a second copy. A shipped style is 45 MB per direction. (Where the network does not share
        # them, they may be read again from the style's file instead: below.)
        weights = self.net.state_dict() if self.device.type == "cpu" else style.weights[direction]
        self._style = replace(style, weights={direction: weights})
        self._reread = False  # whether `style` reads the weights from the file again
        # On a CPU, bf16 runs as an all-bf16 network in channels-last layout rather than under autocast:
        # autocast keeps fp32 weights and activations and casts before every convolution, and those casts,
        # fp32 norms and NCHW reorders took half the time of a ResNet-9 forward (1024 px, AVX512-BF16:
        # 0.69x fp32's time under autocast, 0.33x all-bf16, 44 dB PSNR vs fp32). Inference keeps no fp32
        # master copy to protect, and the norms still accumulate their statistics in fp32.
        self.cast = self.device.type == "cpu" and self.precision.name == "bf16"
        if self.cast:
            self.net.to(dtype=self.precision.dtype, memory_format=torch.channels_last)
            fold_narrow(self.net)  # the last 7x7 convolution (64 -> 3): see styleshift.kernels
        if from_file and engine != "onnx" and (self.cast or self.device.type != "cpu"):
            # The network no longer shares those fp32 tensors: rather than hold them for an export that may
            # never come, read them again from the style's file then (see `style`); not for the onnx engine,
            # which exports on its first picture, maybe after a training run has replaced the file. At
            # 1536 x 2048 in bf16 they were 4% of the peak memory of `apply`.
            self._reread = True
            self._style = replace(self._style, weights={})
        elif self.device.type == "cpu" and self.precision.name == "fp32":
            # Winograd 3x3 convolutions: 0.8x the time of a ResNet-9 forward at 512 px, within 1e-4.
            accelerate(self.net)
        self.multiple = getattr(self.net, "size_multiple", 4)
        self._onnx: OnnxNet | None = None
        self._faster: str | None = None  # what "auto" measured
        # Pictures larger than the memory budget run in tiles of this many pixels a side, with whole-picture
        # normalisation statistics (styleshift.tiling): None sizes them to the budget, 0 never tiles.
        self.tile_size = tile_size
        self._plan: Plan | None = None
        self._plan_error: ValueError | None = None

    @property
    def name(self) -> str:
        return self._style.name

    @property
    def style(self) -> Style:
        """The style this Stylizer runs: its generator config, metadata and this direction's fp32 weights,
        as exporting to ONNX needs them. A bf16 or GPU network loaded from a file keeps no fp32 copy of its
        weights; they are read from the file again here, which must still hold the network that runs: the same
        generator, and weights equal to its own in its own type (ValueError if not: the export would be another
        network). Checked on the weights themselves, not on the file's size and time, which a rewrite within
        the file system's timestamp granularity keeps."""
        if not self._reread:
            return self._style
        path = self._style.path
        try:
            style = load_style(path, directions=(self.direction,))
        except (OSError, ValueError):  # deleted, moved, or no longer a style file
            style = None
        if style is None or not self._runs(style):
            raise ValueError(f"{path}: the style file was changed, moved or deleted since it was loaded; "
                             "load the style again")
        return style

    def _runs(self, style: Style) -> bool:
        """Whether `style` (this direction's weights) is the network that runs, as loaded into it."""
        if style.generator != self._style.generator:
            return False
        mine, theirs = self.net.state_dict(), style.weights[self.direction]
        return mine.keys() == theirs.keys() and all(
            torch.equal(mine[k], v.to(mine[k].device, mine[k].dtype)) for k, v in theirs.items())

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "Stylizer":
        if not Path(path).is_file():  # a file, not a style name
            raise ValueError(f"{path}: no such style file")
        return cls(Path(path), **kwargs)

    @torch.inference_mode()
    def stylize(self, pixels: np.ndarray) -> np.ndarray:
        """H x W x 3 RGB, uint8 or uint16 -> the stylized picture, same size and dtype."""
        top = 65535.0 if pixels.dtype == np.uint16 else 255.0
        # H x W x 3 seen as 1 x 3 x H x W: a channels-last view, no copy
        src = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).to(self.device).permute(2, 0, 1)[None]
        engine, free = self._choose_engine(*src.shape[-2:])
        if engine == "torch" and self.strength == 1.0 and not self.preserve_color:
            # Nothing needs the photo in floats afterwards: pixels go to the network's dtype and back a tile (or
            # a strip) at a time, so no fp32 copy of the picture is made (a 4096 x 4096 one: 200 MB), and a tiled
            # picture holds none in the network's dtype either (1536 x 2048 in bf16: 36 MiB of its peak).
            dtype, layout, bits = self.precision.dtype if self.cast else torch.float32, self._layout, src.dtype
            y = self._forward(src, prepare=lambda t: _from_pixels(t, top).to(dtype, memory_format=layout),
                              finish=lambda t: _to_pixels(t.float(), top).to(bits), free=free)
            return np.ascontiguousarray(y[0].permute(1, 2, 0).cpu().numpy())  # no copy where it is one already
        x = _from_pixels(src, top)
        del src
        y = self.finish(self.stylize_onnx(x) if engine == "onnx" else self._forward(x, free=free).float(), x)
        del x  # with y, and a third copy below, a 4096 x 4096 picture would hold 600 MB of floats
        return _to_pixels(y[0], top).permute(1, 2, 0).cpu().numpy().astype(pixels.dtype)  # in place: y is ours

    def finish(self, styled: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
        """The network's output with the photo's colours (if preserve_color), at the chosen strength."""
        if self.preserve_color:
            styled = preserve_colour(styled, photo)
        return blend(styled, photo, self.strength)

    def engine_for(self, height: int, width: int) -> str:
        """The engine that stylizes a height x width picture: "torch" or "onnx"."""
        return self._choose_engine(height, width)[0]

    def _choose_engine(self, height: int, width: int) -> tuple[str, int | None]:
        """engine_for, and the free memory it read to choose (None if it read none): the torch engine then
        tiles the picture by that same reading, so the two choices agree."""
        if self.engine != "auto":
            return self.engine, None
        # Pictures that need tiles run in torch (whole-picture statistics); onnxruntime would run them whole.
        padded = torch.empty(1, 3, height + (-height) % self.multiple, width + (-width) % self.multiple,
                             device="meta")
        if self.device.type != "cpu" or not onnx_available():
            return "torch", None
        free = self._free_memory(padded.shape[1])
        if self._tiling(padded, free)[0]:
            return "torch", free
        if self._faster is None:
            try:
                self._faster = faster_engine(self.stylize_tensor, self.stylize_onnx)
            except (RuntimeError, ValueError, OSError):
                # "auto" must never do worse than torch: an export or session that fails (an unwritable
                # cache, an operator this onnxruntime lacks) leaves the torch engine, which works.
                self._faster = "torch"
        return self._faster, free

    @torch.inference_mode()
    def stylize_onnx(self, x: torch.Tensor) -> torch.Tensor:
        """stylize_tensor by onnxruntime: the whole picture at once, in fp32, padded and cropped alike."""
        if self._onnx is None:
            self._onnx = OnnxNet(cached_onnx(self.style, self.direction))
        h, w = x.shape[-2:]
        return self._onnx(pad_to_multiple(x, self.multiple, min_side(self.multiple)))[..., :h, :w]

    def stylize_picture(self, picture: Picture) -> Picture:
        """A decoded file (see styleshift.images) -> stylized, with its alpha, ICC profile and EXIF kept."""
        return replace(picture, pixels=self.stylize(picture.pixels))

    @torch.inference_mode()
    def stylize_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W in [-1, 1] -> the same shape. Padded to the network's stride, then cropped back,
        so the output keeps the input's exact size (never squashed)."""
        return self._forward(x).float()

    def _forward(self, x: torch.Tensor, prepare: Pixelwise | None = None, finish: Pixelwise | None = None,
                 free: int | None = None) -> torch.Tensor:
        """`finish(net(prepare(x)))` for a batch of any size, cropped back to it; by default prepare casts to
        the network's dtype and finish leaves its output so. Both run a tile or a strip at a time (pixelwise):
        no copy of the batch in another type is made for them beyond what the network itself reads (a whole
        picture's input; a tiled one's downscaled copy, where its statistics are estimated). free: the memory
        free (_free_memory), where the caller read it already."""
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple, min_side(self.multiple))
        if prepare is None and self.cast:
            prepare = lambda t: t.to(self.precision.dtype, memory_format=self._layout)  # noqa: E731
        free = self._free_memory(x.shape[1]) if free is None else free
        tile, budget = self._tiling(x, free)
        heap = contextlib.nullcontext()
        if self.device.type == "cpu":  # see styleshift.heap
            if tile:  # the tiler keeps freed memory pass by pass where that is safe
                return_freed_memory()
            elif self._may_keep_freed_memory(x, free):
                heap = keep_freed_memory()
        if not tile:  # before the heap keeps freed memory: its strips' copies would settle in the kept blocks
            x = pixelwise(x, prepare, self._layout)
        with heap, contextlib.nullcontext() if self.cast else self.precision.autocast():
            y = tiled_forward(self.net, x, self._plan, self.tile_size, budget, prepare, finish) if tile else self.net(x)
        if not tile:
            del x
            y = pixelwise(y, finish, self._layout)
        return y[..., :h, :w]

    @property
    def _layout(self) -> torch.memory_format:
        """The network's input layout: channels-last for the bf16 network on a CPU (see __init__)."""
        return torch.channels_last if self.cast else torch.contiguous_format

    def _free_memory(self, channels: int) -> int:
        """The memory free now, read once for a picture's budget, whole-picture limit and heap choice alike.
        Read after the network's tiling plan is made, where the picture may need one (tiles; on a CPU the
        heap choice), so that the first picture's reading is what the probe left, not what it held."""
        if self.tile_size != 0 or self.device.type == "cpu":
            self._get_plan(channels)
        return available_memory(self.device)

    def _tiling(self, x: torch.Tensor, free: int) -> tuple[int, int]:
        """(tile side, memory budget) for a padded batch, given the memory free now; tile side 0 runs it
        whole."""
        if self.tile_size == 0:
            return 0, 0
        plan = self._get_plan(x.shape[1])
        if plan is None:
            if self.tile_size is not None:
                raise self._plan_error
            return 0, 0  # a network tiling cannot reason about runs whole
        budget = working_memory(self.device, free)
        h, w = x.shape[-2:]
        if self.tile_size is None:
            return choose_tile_size(h, w * x.shape[0], plan, budget, whole_picture_limit(self.device, free)), budget
        return (self.tile_size if self.tile_size < max(h, w) else 0), budget

    def _get_plan(self, channels: int) -> Plan | None:
        """The network's tiling plan, made once; None where tiling cannot reason about it (_plan_error)."""
        if self._plan is None and self._plan_error is None:
            try:
                self._plan = make_plan(self.net, in_channels=channels)
            except ValueError as e:
                self._plan_error = e
            if self.device.type == "cpu":
                hand_back()  # the probe's allocations, and for a bf16 network its fp32 copy
        return self._plan

    def _may_keep_freed_memory(self, x: torch.Tensor, free: int) -> bool:
        """Whether a padded batch run whole may keep its freed memory (styleshift.heap), trading memory for
        time: only where its peak then, KEPT_PEAK times the plan's estimate, fits a quarter of what is free.
        (Not the whole-picture limit: fp32 at 1024 x 1024 peaks above that already, and keeping then costs
        it 14% more memory for 0.8x the time.)"""
        plan = self._get_plan(x.shape[1])
        return plan is not None and \
            KEPT_PEAK * plan.bytes_per_pixel * x[:, 0].numel() <= free / 4


def _from_pixels(x: torch.Tensor, top: float) -> torch.Tensor:
    """Pixel values in 0..top (any integer dtype) -> fp32 in [-1, 1], the network's range."""
    return x.float().mul_(2.0 / top).sub_(1.0)


def _to_pixels(y: torch.Tensor, top: float) -> torch.Tensor:
    """fp32 in [-1, 1] (modified in place) -> 0..top, rounded, same shape and dtype."""
    return y.add_(1.0).mul_(top / 2.0).round_().clamp_(0, top)
