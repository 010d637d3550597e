"""Exporting a style's generator to ONNX, and checking that onnxruntime computes what PyTorch does.

The model takes `input`, N x 3 x H x W float32 RGB in [-1, 1], and gives `output` of the same shape, with
N, H and W dynamic. H and W must be multiples of the network's `size_multiple` (4: two stride-2 steps);
the Stylizer pads a picture by reflection to such a size and crops the output back, and other callers must
do the same. The style's configuration is stored as JSON under the `styleshift` key of the model's
metadata_props, so the file describes itself like an exported .safetensors style.

Which exporter: the TorchScript one (`torch.onnx.export(..., dynamo=False)`). Both exporters give the same
outputs for every generator variant (resnet_9blocks / resnet_6blocks / mobile_resnet; transpose / resize
upsampling; stride / blur downsampling, whose kornia filter2d reflect padding exports as ONNX Pad), within
about 2e-6 at 256x384. But the dynamo exporter needs the extra package onnxscript and took 3-7 s per export
where the TorchScript one took 0.2-0.6 s; the Stylizer's onnx engine exports on first use, so that
difference is felt. Instance normalisation (a group-norm subclass, see networks/layers.py) exports as ONNX
InstanceNormalization.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .checkpoint import STYLE_FORMAT, Style
from .fsutil import atomic_write

OPSET = 17  # InstanceNormalization, Resize and reflect Pad are all stable by then; onnxruntime >= 1.17 runs it
TOLERANCE = 1e-3  # fp32 parity: a max abs difference above this is a wrong export, not rounding
METADATA_KEY = "styleshift"
PARITY_SIZE = (256, 384)  # H x W: a multiple of 4, and not square, so a transposed H/W would show


def _style_and_net(style_or_stylizer, direction: str) -> tuple[Style, str, torch.nn.Module]:
    """The style, the direction (a Stylizer's own) and a fresh fp32 CPU copy of its generator, whatever
    device and precision the Stylizer uses."""
    if not isinstance(style_or_stylizer, Style):  # a Stylizer
        style_or_stylizer, direction = style_or_stylizer.style, style_or_stylizer.direction
    return style_or_stylizer, direction, style_or_stylizer.build(direction)


def export_onnx(style_or_stylizer, path: str | os.PathLike, direction: str = "forward", opset: int = OPSET) -> Path:
    """Write the generator of `direction` (a Stylizer's own direction if given one) to `path`, atomically.

    The input's H and W must be multiples of the returned model's `size_multiple` metadata (see module doc).
    """
    import onnx

    style, direction, net = _style_and_net(style_or_stylizer, direction)
    multiple = getattr(net, "size_multiple", 4)
    example = torch.zeros(1, 3, 8 * multiple, 8 * multiple)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about kornia's trace-time checks.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes={name: {0: "batch", 2: "height", 3: "width"}
                                                   for name in ("input", "output")},
        )
    model = onnx.load_model_from_string(buffer.getvalue())
    info = {
        "format": STYLE_FORMAT, "name": style.name, "direction": direction, "generator": asdict(style.generator),
        "meta": style.meta, "size_multiple": multiple, "input": "N x 3 x H x W float32 RGB in [-1, 1]",
    }
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info, sort_keys=True)
    model.producer_name = "styleshift"
    onnx.checker.check_model(model)
    blob = model.SerializeToString()
    atomic_write(path, lambda f: f.write(blob))
    return Path(path)


def onnx_info(path: str | os.PathLike) -> dict:
    """The style configuration stored in an exported model's metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path}: not a styleshift ONNX model (no '{METADATA_KEY}' metadata)")
    return json.loads(props[METADATA_KEY])


def parity_picture(style: Style, direction: str, image: str | os.PathLike | None = None,
                   size: tuple[int, int] = PARITY_SIZE) -> tuple[torch.Tensor, str]:
    """A 1 x 3 x H x W picture in [-1, 1] to compare engines on, and where it came from: `image`, else the
    first picture the style was trained on (its photos for forward), else the repository's sample photos."""
    from PIL import Image

    from .images import read_image, scan_images

    candidates = [Path(image)] if image is not None else []
    trained_on = style.meta.get("content_dir" if direction == "forward" else "style_dir")
    sample = Path(__file__).resolve().parent.parent / "data" / "sample" / ("photos" if direction == "forward"
                                                                          else "paintings")
    for folder in (Path(trained_on) if trained_on else None, sample):
        if image is None and folder is not None and folder.is_dir():
            candidates += scan_images(folder)[:1]
    if not candidates:
        raise ValueError("no picture to check the export on; pass one")
    pixels = read_image(candidates[0]).rgb8()
    h, w = size
    resized = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(resized).permute(2, 0, 1)[None] / 127.5 - 1.0
    return x, str(candidates[0])


def parity(path: str | os.PathLike, style_or_stylizer, x: torch.Tensor, direction: str = "forward") -> float:
    """max |onnxruntime - PyTorch| over the outputs for `x` (N x 3 x H x W in [-1, 1], H and W multiples of 4),
    both in fp32 on the CPU."""
    from .engine import OnnxNet

    _, _, net = _style_and_net(style_or_stylizer, direction)
    with torch.inference_mode():
        expected = net(x)
    got = OnnxNet(path)(x)
    return float((got - expected).abs().max())
