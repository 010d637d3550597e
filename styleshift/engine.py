"""The onnxruntime engine: the style's generator exported to ONNX (see styleshift.export) and run by
onnxruntime on the CPU, called like the PyTorch network.

The exported model is cached, so only the first use of a style pays for the export (under a second):
    $STYLESHIFT_CACHE, else $XDG_CACHE_HOME/styleshift, else ~/.cache/styleshift
holds onnx/<key>.onnx, where <key> hashes the weights, the generator config, the direction and the opset;
retraining a style changes its weights and so its key. Writes are atomic, so processes converting
side by side (torchrun) may export the same style at once.

onnxruntime computes in fp32 and runs the whole picture at once (no tiling).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import Style

ENGINES = ("auto", "torch", "onnx")
KEY_VERSION = "1"  # bump when the export changes in a way old cached files must not be reused


class EngineUnavailable(RuntimeError):
    """The onnx engine was asked for where it cannot run; str() is one line saying what to do."""


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_onnx() -> None:
    if not onnx_available():
        raise EngineUnavailable("the onnx engine needs onnxruntime and onnx: pip install 'styleshift[onnx]'")


def cache_dir() -> Path:
    if os.environ.get("STYLESHIFT_CACHE"):
        return Path(os.environ["STYLESHIFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "styleshift"


def style_key(style: Style, direction: str, opset: int) -> str:
    digest = hashlib.sha256(f"{KEY_VERSION} {direction} {opset} ".encode())
    digest.update(json.dumps(asdict(style.generator), sort_keys=True).encode())
    for name, tensor in sorted(style.weights[direction].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_onnx(style: Style, direction: str) -> Path:
    """The style's generator as an ONNX file in the cache, exported now if it is not there yet."""
    from .export import OPSET, export_onnx

    path = cache_dir() / "onnx" / f"{style_key(style, direction, OPSET)}.onnx"
    if not path.exists():
        export_onnx(style, path, direction=direction, opset=OPSET)
    return path


def pad_to_multiple(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """Pad N x C x H x W on the bottom and right so H and W are multiples of `multiple` and at least `minimum`."""
    h, w = x.shape[-2:]
    ph = max(minimum - h, 0) + (-max(h, minimum)) % multiple
    pw = max(minimum - w, 0) + (-max(w, minimum)) % multiple
    if not (ph or pw):
        return x
    # Reflection continues the picture's texture at the border; it needs a side longer than the pad.
    mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
    if x.dtype == torch.uint16:  # 16-bit pixels: PyTorch pads no uint16, but padding only copies, so as int16
        return F.pad(x.view(torch.int16), (0, pw, 0, ph), mode=mode).view(torch.uint16)
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def min_side(multiple: int) -> int:
    """The smallest side a generator of this stride takes: its reflection padding (up to 3 pixels, at the
    coarsest scale 1) needs a side longer than the pad there, so a 1 x 5000 strip is padded up to it."""
    return 4 * multiple


class OnnxNet:
    """An exported generator run by onnxruntime: N x 3 x H x W float tensor in [-1, 1], H and W multiples
    of the network's size_multiple -> the output, on the input's device."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        require_onnx()
        import onnxruntime as ort

        options = ort.SessionOptions()
        # As many threads as torch uses (its default is the cores this process may use; OMP_NUM_THREADS
        # and torch.set_num_threads, as each process under torchrun sets, lower it), so both engines get
        # the same share of the machine. One graph runs at a time: no inter-op threads.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (y,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(y).to(x.device)


def faster_engine(run_torch: Callable[[torch.Tensor], object], run_onnx: Callable[[torch.Tensor], object],
                  size: int = 256, runs: int = 2) -> str:
    """"torch" or "onnx": whichever stylizes a size x size picture faster here, the best of `runs` each.

    The first run of each also pays for one-off set-up (memory arenas, kernel choice); the best of two
    leaves it out. A few hundred milliseconds on a light generator, seconds on the reference one: it is
    measured once per Stylizer and only where both engines can run (CPU).
    """
    x = torch.linspace(-1.0, 1.0, size * size).reshape(1, 1, size, size).expand(1, 3, size, size).contiguous()
    best = {}
    for name, run in (("torch", run_torch), ("onnx", run_onnx)):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return "onnx" if best["onnx"] < best["torch"] else "torch"
