"""Tiled inference equals untiled inference: whole-picture instance-norm statistics, halos that cover the
receptive field, no seams. Tiny random networks on a real photo, so most checks take well under a second; the
shipped style on a 1024 px photo takes a few."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTOS
from styleshift.checkpoint import Style
from styleshift.config import GeneratorConfig
from styleshift.networks import build_generator
from styleshift.stylizer import Stylizer
from styleshift.tiling import choose_tile_size, make_plan, spans, tiled_forward

VARIANTS = [
    dict(arch="resnet_6blocks"),  # the reference's layers: strided convolutions, transposed convolutions
    dict(arch="resnet_6blocks", n_blocks=2, downsample="blur", upsample="resize"),
    dict(arch="mobile_resnet", n_blocks=2, upsample="subpixel"),
    dict(arch="resnet_6blocks", n_blocks=1, downsample="blur", upsample="subpixel"),
]


def perturbed(cfg: GeneratorConfig, seed: int = 0) -> torch.nn.Module:
    """A random generator whose biases are not zero and whose weights are not tiny, so that each layer's
    statistics differ clearly from tile to tile."""
    torch.manual_seed(seed)
    return perturb(build_generator(cfg))


def perturb(net: torch.nn.Module) -> torch.nn.Module:
    """`net` in eval mode, without gradients, each parameter moved by noise of 0.1 (from torch's global seed)."""
    net.eval().requires_grad_(False)
    for p in net.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    return net


def photo(h=150, w=203, index=0) -> torch.Tensor:
    with Image.open(PHOTOS[index]) as im:
        a = np.asarray(im.convert("RGB").resize((w, h)), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1


def psnr(a, b) -> float:
    mse = (a - b).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-30))


def budget_for(plan, x, checkpoints: int) -> int:
    """The smallest memory budget under which the tiler keeps `checkpoints` checkpoint-sized maps of `x`."""
    return int(plan.checkpoint_bytes_per_pixel * x.shape[-2] * x.shape[-1] * checkpoints / 0.75) + 1


def padded(x, multiple=4):
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, (-w) % multiple, 0, (-h) % multiple), mode="reflect")


# Errors far below one 8-bit level (0.008 in [-1, 1]), as fp32 rounding leaves, are no seams: the ratios below
# compare errors plus this, so that where tiled and untiled agree to fp32 precision they are about 1.
NEGLIGIBLE = 1e-4


def starts(length, tile, stride) -> list[int]:
    """Where tiles of `tile` pixels start along a side, the first excepted: the edges between tiles."""
    return [a for a, _ in spans(length, tile, stride)[1:]]


def border_error_ratio(whole, tiled, rows, columns, width=2) -> float:
    """Mean error within `width` pixels of an edge between tiles over the mean error elsewhere (rows, columns:
    where tiles start)."""
    err = (whole - tiled).abs().sum(1)[0]
    mask = torch.zeros(err.shape, dtype=torch.bool)
    for a in rows:
        mask[max(a - width, 0):a + width] = True
    for a in columns:
        mask[:, max(a - width, 0):a + width] = True
    return (err[mask].mean().item() + NEGLIGIBLE) / (err[~mask].mean().item() + NEGLIGIBLE)


def step_error_ratio(whole, tiled, rows, columns) -> float:
    """How much larger the error is in a step between neighbouring pixels across an edge between two tiles
    than in a step inside a tile (rows, columns: where tiles start). A seam is a step the untiled picture does
    not have: an error spread evenly over a tile (its own statistics, say) cancels out of the steps inside it
    but not of those across its edges, so this shows seams even where the tiles' error is as large as the
    seam, which border_error_ratio does not (hand tiling: 0.95 there). About 1 without seams."""
    edges, inside = [], []
    for dim, starting in ((-1, columns), (-2, rows)):
        err = (whole.diff(dim=dim) - tiled.diff(dim=dim)).abs().sum(1)[0]  # step to the right / downwards
        across = torch.zeros(whole.shape[dim] - 1, dtype=torch.bool)
        across[[a - 1 for a in starting]] = True  # steps from the last pixel of one tile to the next one's first
        if dim == -1:
            err = err.T  # steps along rows
        edges.append(err[across].flatten())
        inside.append(err[~across].flatten())
    return (torch.cat(edges).mean().item() + NEGLIGIBLE) / (torch.cat(inside).mean().item() + NEGLIGIBLE)


def no_seams(whole, tiled, rows, columns) -> bool:
    """The error along edges between tiles is no larger than inside tiles, per pixel and per step, up to
    rounding noise (bf16: 0.93-1.13 measured)."""
    return max(border_error_ratio(whole, tiled, rows, columns), step_error_ratio(whole, tiled, rows, columns)) <= 1.25


def naive_tiles(net, x, tile, halo, stride):
    """What tiling by hand gives: each tile, with a halo that covers the receptive field, run through the
    network alone, so its instance norms normalise with the tile's own statistics."""
    out = None
    for y0, y1 in spans(x.shape[-2], tile, stride):
        for x0, x1 in spans(x.shape[-1], tile, stride):
            a0, b0 = max(y0 - halo, 0), max(x0 - halo, 0)
            y = net(x[..., a0:y1 + halo, b0:x1 + halo])
            if out is None:
                out = torch.empty(x.shape[0], y.shape[1], *x.shape[-2:], dtype=y.dtype)
            out[..., y0:y1, x0:x1] = y[..., y0 - a0:y1 - a0, x0 - b0:x1 - b0]
    return out


@pytest.mark.parametrize("checkpoints", [2, 1], ids=["two-checkpoints", "one-checkpoint"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_tiled_equals_untiled_and_has_no_seams(variant, checkpoints):
    net = perturbed(GeneratorConfig(ngf=8, **variant))
    plan = make_plan(net)
    assert any(plan.residual)
    assert any(plan.tails)  # with two checkpoints, blocks run as x + tail(y): each convolution once
    x = padded(photo())
    tile = 32
    assert len(spans(x.shape[-1], tile, plan.stride)) >= 3  # tiles with real neighbours on both sides
    # A budget for two checkpoint-sized buffers (residual blocks updated in place), or for only one.
    budget = budget_for(plan, x, checkpoints)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_forward(net, x, plan, tile, budget)
    assert whole.std() > 0.05  # a picture, not a constant
    assert psnr(whole, tiled) >= 40
    h, w = x.shape[-2:]
    assert no_seams(whole, tiled, starts(h, tile, plan.stride), starts(w, tile, plan.stride))


def test_naive_tiling_fails_the_same_checks():
    """The checks above can fail: tiles normalised by their own statistics give another picture. (The steps at
    their edges are lost in this random network's noise: the shipped style's test below shows those seams.)"""
    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2))
    plan = make_plan(net)
    x = padded(photo())
    with torch.inference_mode():
        assert psnr(net(x), naive_tiles(net, x, 32, plan.halo, plan.stride)) < 40


def test_the_shipped_style_tiles_a_1024px_photo_without_seams():
    """A trained style on a 1024 x 1024 sample photo, at the precision `apply` picks on this machine (bf16
    where the CPU has bf16 units): tiled and untiled agree (PSNR >= 40 dB), and the error of steps across tile
    edges is no larger than inside tiles. Tiling by hand fails that: its tiles' own statistics leave steps
    at their edges (3.2x the error inside, measured)."""
    stylizer = Stylizer(device="cpu")
    net, plan, tile = stylizer.net, make_plan(stylizer.net), 256
    x = photo(1024, 1024).to(next(net.parameters()).dtype)
    if stylizer.cast:
        x = x.contiguous(memory_format=torch.channels_last)
    assert len(spans(1024, tile, plan.stride)) == 4
    with torch.inference_mode():
        whole = net(x).float()
        tiled = tiled_forward(net, x, plan, tile, 1 << 34).float()  # exact statistics
        naive = naive_tiles(net, x, tile, plan.halo, plan.stride).float()
    assert whole.std() > 0.2  # a picture
    assert psnr(whole, tiled) >= 40  # fp32: 123-126 dB; bf16 (both rounded, differently): 45-48 dB
    edges = starts(1024, tile, plan.stride)
    assert no_seams(whole, tiled, edges, edges)  # bf16: 0.93-1.13 over 3 photos, 3 tile sizes
    assert step_error_ratio(whole, naive, edges, edges) >= 2  # 3.2


def test_tiles_sized_to_the_memory_budget_leave_no_seams(monkeypatch):
    """As `apply` tiles a picture larger than its memory budget: tile sizes, strips and widened tiles chosen
    by the tiler, pass by pass. No pass leaves a seam where its tiles meet (each pass's edges, in picture
    pixels), with the shipped style on a 1024 px photo."""
    from styleshift import stylizer as module
    from styleshift.tiling import Tiler

    edges, real_pass = [set(), set()], Tiler._pass

    def spy_pass(self, source, first, scale, *args, **kwargs):
        out = real_pass(self, source, first, scale, *args, **kwargs)
        _, rows, columns = self._grid
        for side, cuts in zip(edges, (rows, columns)):
            side.update(a * scale for a, _ in cuts[1:])  # in picture pixels
        return out

    monkeypatch.setattr(Tiler, "_pass", spy_pass)
    monkeypatch.setattr(module, "working_memory", lambda device, free=None: 24 << 20)  # room for exact passes
    monkeypatch.setattr(module, "whole_picture_limit", lambda device, free=None: 0)
    x = photo(1024, 1024, 3)
    tiled = Stylizer(device="cpu").stylize_tensor(x)
    assert edges[0] and edges[1]  # it was tiled
    whole = Stylizer(device="cpu", tile_size=0).stylize_tensor(x)
    assert psnr(whole, tiled) >= 40
    assert no_seams(whole, tiled, sorted(edges[0]), sorted(edges[1]))


def test_halo_of_the_reference_generator():
    """c7s1 (3 px), two stride-2 convolutions (1 + 2 px), 18 trunk 3x3 convolutions at 1/4 scale (72 px),
    two transposed convolutions (4 + 2 px), c7s1 (3 px): 87 px, up to a multiple of the stride 4."""
    plan = make_plan(build_generator(GeneratorConfig(arch="resnet_9blocks", ngf=4)))
    assert (plan.halo, plan.stride, len(plan.norms)) == (88, 4, 2 + 1 + 18 + 2)
    # A pass that stops at a norm needs only the reach of its layer's leaves before it: a residual block's first
    # norm is one 3x3 convolution at 1/4 scale away (4 input px), its second two; norms that are layers, none.
    blocks = [k for k, norm in enumerate(plan.norms) if plan.layers[plan.norm_layer[k]] is not norm]
    assert [plan.norm_reach[k] for k in blocks] == [4.0, 8.0] * 9
    assert all(plan.norm_reach[k] == 0 for k in range(len(plan.norms)) if k not in blocks)
    net = build_generator(GeneratorConfig(arch="resnet_9blocks", ngf=4)).to(torch.bfloat16)
    assert make_plan(net).norm_reach == plan.norm_reach  # a bf16 plan, probed on an fp32 copy


def test_a_norm_after_a_skip_inside_its_layer_stays_exact():
    """A layer whose norm comes after a convolution and a skip addition, with more layers after the norm: the
    pass that measures that norm takes the halo of the convolution before it only, and the result is still
    the untiled one."""
    from torch import nn

    class SkipThenNorm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.pad1, self.conv1 = nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3)
            self.norm, self.pad2, self.conv2 = nn.InstanceNorm2d(c), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3)

        def forward(self, x):
            return self.conv2(self.pad2(torch.relu(self.norm(self.conv1(self.pad1(x)) + x))))

    torch.manual_seed(0)
    net = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 8, 7), nn.InstanceNorm2d(8), nn.ReLU(),
                        SkipThenNorm(8), nn.InstanceNorm2d(8), nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(8, 3, 3),
                        nn.Tanh())
    plan = make_plan(net)
    assert plan.norm_reach[plan.norm_layer.index(4)] == 1.0
    x = padded(photo(96, 120))
    with torch.inference_mode():
        assert torch.allclose(tiled_forward(net, x, plan, 32, 1 << 30), net(x), atol=1e-5)


def test_estimated_statistics_are_still_seamless():
    """A picture whose checkpoint exceeds the budget gets statistics from a downscaled copy: no longer equal
    to the untiled output, but the same statistics in every tile, so still no seams."""
    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2))
    plan = make_plan(net)
    x = padded(photo(200, 264))
    tile = 32
    budget = int(plan.checkpoint_bytes_per_pixel * x.shape[-2] * x.shape[-1]) - 1
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_forward(net, x, plan, tile, budget)
    assert psnr(whole, tiled) < 60  # estimated, not exact: this really took the other path
    assert no_seams(whole, tiled, starts(x.shape[-2], tile, plan.stride), starts(x.shape[-1], tile, plan.stride))


def test_prepare_and_finish_run_per_tile_as_on_the_whole_picture():
    """tiled_forward with prepare and finish on 8-bit pixels gives finish(tiled_forward(prepare(pixels))) to the
    bit, with exact statistics and with estimated ones (their downscaled copy made from prepared strips), and
    for a network whose last layer is a norm (whose measured input is not the output, so not finished)."""
    from torch import nn

    def prepare(t):
        return t.float().mul(2 / 255).sub(1)

    def finish(t):
        return t.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)

    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2))
    ends_in_norm = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4))
    x = padded(photo(200, 264))
    pixels = ((x + 1) * 127.5).round().to(torch.uint8)
    for network in (net, ends_in_norm):
        plan = make_plan(network)
        estimated = int(plan.checkpoint_bytes_per_pixel * x.shape[-2] * x.shape[-1]) - 1
        for budget in (1 << 30, estimated):
            with torch.inference_mode():
                expected = finish(tiled_forward(network, prepare(pixels), plan, 32, budget))
                got = tiled_forward(network, pixels, plan, 32, budget, prepare, finish)
            assert got.dtype == torch.uint8 and torch.equal(got, expected)


def test_tiny_8_and_16_bit_pictures_are_padded_and_stylized():
    """A picture thinner than the network's padding is padded by replication, in its own type (8 or 16 bits)."""
    cfg = GeneratorConfig(arch="resnet_6blocks", ngf=8, n_blocks=2)
    net = perturbed(cfg, seed=2)
    style = Style(cfg, {"forward": net.state_dict(), "inverse": net.state_dict()})
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        pixels = ((photo(5, 40) + 1) * top / 2).round()[0].permute(1, 2, 0).numpy().astype(dtype)
        for tile in (None, 0):
            out = Stylizer(style, device="cpu", tile_size=tile).stylize(pixels)
            assert out.shape == pixels.shape and out.dtype == dtype and out.std() > 0


def test_stylizer_tiles_odd_sizes_and_batches():
    cfg = GeneratorConfig(arch="resnet_6blocks", ngf=8, n_blocks=2)
    net = perturbed(cfg, seed=1)
    style = Style(cfg, {"forward": net.state_dict(), "inverse": net.state_dict()})
    x = torch.cat([photo(150, 203, 0), photo(150, 203, 1)])
    whole = Stylizer(style, device="cpu", precision="fp32", tile_size=0).stylize_tensor(x)
    tiled = Stylizer(style, device="cpu", precision="fp32", tile_size=40).stylize_tensor(x)
    assert tiled.shape == whole.shape == x.shape
    for n in range(2):  # each picture its own statistics
        assert psnr(whole[n], tiled[n]) >= 40
    pixels = ((photo(37, 53) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy().astype(np.uint8)
    assert Stylizer(style, device="cpu", tile_size=16).stylize(pixels).shape == pixels.shape


def test_tile_size_follows_the_memory_budget():
    plan = make_plan(build_generator(GeneratorConfig(arch="resnet_9blocks", ngf=64)))
    h, w = 1536, 2048
    sizes = [choose_tile_size(h, w, plan, b << 20) for b in (16, 64, 256, 1024, 4096, 65536)]
    tiled = [s for s in sizes if s]
    assert tiled == sorted(tiled) and all(s % plan.stride == 0 and s >= plan.halo for s in tiled)
    assert sizes[-1] == 0  # it fits whole
    assert sizes[2] > 0  # the default CPU budget tiles a 3 Mpx picture
    assert choose_tile_size(64, 64, plan, 256 << 20) == 0
    # Beyond the tiles' budget but within the whole-picture limit, a picture still runs whole.
    big = int(plan.bytes_per_pixel * 512 * 512)
    assert choose_tile_size(512, 512, plan, big // 4) > 0
    assert choose_tile_size(512, 512, plan, big // 4, whole_limit=big) == 0


@pytest.mark.parametrize("length, tile, halo", [(384, 128, 4), (1536, 304, 12), (100, 36, 8), (64, 64, 8)])
def test_even_windows_are_one_size_and_hold_each_span_with_its_halo(length, tile, halo):
    """Tiles read in any order get windows of one size (their layers then reuse each other's memory blocks):
    each still holds its span and the halo on both sides (within the picture), and starts on the alignment."""
    from styleshift.tiling import _windows

    rows = spans(length, tile, 4)
    windows = _windows(rows, halo, length, even=True)
    assert len({b - a for a, b in windows}) == 1
    for (y0, y1), (a0, a1) in zip(rows, windows):
        assert 0 <= a0 <= max(y0 - halo, 0) and min(y1 + halo, length) <= a1 <= length and a0 % 4 == 0
    assert _windows(rows, halo, length, even=False) == [(max(a - halo, 0), min(b + halo, length)) for a, b in rows]


def test_strips_lower_than_the_halo():
    """Tiles smaller than the halo: the rows a strip reads above itself span several strips written in place."""
    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2))
    plan = make_plan(net)
    x = padded(photo(96, 120))
    with torch.inference_mode():
        whole = net(x)
        budget = budget_for(plan, x, 1)  # one checkpoint
        tiled = tiled_forward(net, x, plan, plan.stride, budget)
    assert psnr(whole, tiled) >= 40


def test_cli_tile_size(tiny_style, tmp_path):
    from click.testing import CliRunner

    from styleshift.cli import main

    src = tmp_path / "photo.png"
    with Image.open(PHOTOS[2]) as im:
        im.convert("RGB").resize((90, 61)).save(src)
    outputs = {}
    for tile in (0, 16):
        dst = tmp_path / f"out{tile}.png"
        result = CliRunner().invoke(main, ["apply", str(src), "-s", str(tiny_style), "-o", str(dst),
                                           "--tile-size", str(tile), "--device", "cpu", "--precision", "fp32"])
        assert result.exit_code == 0, result.output
        outputs[tile] = np.asarray(Image.open(dst), dtype=np.int16)
    assert outputs[0].shape == (61, 90, 3)
    assert np.abs(outputs[0] - outputs[16]).max() <= 1  # equal up to rounding to 8 bits


@pytest.mark.parametrize("tile", [0, 40], ids=["whole", "tiled"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_bf16_stylizer_matches_fp32(variant, tile):
    """precision bf16 on a CPU runs an all-bf16, channels-last network (no autocast): PSNR at least 35 dB
    against fp32, whole or tiled, and the tiled bf16 result still matches the whole one."""
    cfg = GeneratorConfig(ngf=8, **variant)
    net = perturbed(cfg, seed=2)
    style = Style(cfg, {"forward": net.state_dict(), "inverse": net.state_dict()})
    x = photo(96, 136)
    ref = Stylizer(style, device="cpu", precision="fp32", tile_size=0).stylize_tensor(x)
    low = Stylizer(style, device="cpu", precision="bf16", tile_size=tile)
    assert next(low.net.parameters()).dtype == torch.bfloat16
    y = low.stylize_tensor(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ref.std() > 0.05
    assert psnr(ref, y) >= 35
    if tile:
        plan = low._plan
        assert plan.dtype == torch.bfloat16
        assert all(m in set(low.net.modules()) for m in plan.norms)  # the bf16 network's own modules
        whole = Stylizer(style, device="cpu", precision="bf16", tile_size=0).stylize_tensor(x)
        assert psnr(whole, y) >= 38  # both rounded to bf16, differently: measured 41-45 dB


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
def test_split_residual_blocks_run_and_wide_strips_stay_exact(layout, monkeypatch):
    """With a budget for two checkpoint-sized buffers and tiles sized to it, every residual block runs as
    x + tail(y) (each convolution once; the first after the encoder's last norm and ReLU are applied to the
    checkpoint in place), and the result still equals the untiled one. In channels-last layout, with room
    for the encoder's and decoder's maps as well, results go over their sources a strip at a time; strips too
    short for good convolutions get widened tiles, and the result is as exact."""
    from styleshift import tiling
    from styleshift.tiling import Tiler

    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=4), seed=3).to(memory_format=layout)
    plan = make_plan(net)
    x = padded(photo(280, 200)).contiguous(memory_format=layout)  # 70 rows at the blocks' scale: in-place
    tails, scales, sizes, fitting = [], [], [], []                # updates go past their first 64 rows
    real_pass, real_spans, real_fitting = Tiler._pass, spans, tiling.fitting_tile

    def spy_pass(self, *args, tail=None, **kwargs):
        tails.append(tail is not None)
        scales.append(args[2])
        return real_pass(self, *args, tail=tail, **kwargs)

    def spy_spans(length, tile, align):
        sizes.append(tile)
        return real_spans(length, tile, align)

    def spy_fitting(*args):
        fitting.append(real_fitting(*args))
        return fitting[-1]

    monkeypatch.setattr(Tiler, "_pass", spy_pass)
    monkeypatch.setattr(tiling, "spans", spy_spans)
    monkeypatch.setattr(tiling, "fitting_tile", spy_fitting)
    # two checkpoints; in channels-last four, so a half-scale map and the checkpoint fit beside each other
    checkpoints = 2 if layout == torch.contiguous_format else 4
    budget = budget_for(plan, x, checkpoints)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_forward(net, x, plan, None, budget)
    assert sum(tails) == 4
    assert psnr(whole, tiled) >= 100  # fp32, exact statistics: equal up to rounding (about 130 dB)
    # per pass: the tile its memory allows (input pixels), the height of its strips and the width of their tiles
    # (pixels at the pass's scale)
    widened = [wide * scale > tile > tall * scale
               for scale, tile, tall, wide in zip(scales, fitting, sizes[0::2], sizes[1::2])]
    assert len(widened) == len(tails) and any(widened) == (layout == torch.channels_last)


def test_cpu_tiles_take_only_the_memory_their_halo_needs(monkeypatch):
    """With memory to spare, a CPU pass's tiles take CPU_TILE_MEMORY in fp32 and half that in bf16, tiles of
    as many pixels (or what 32 halos a side need, if more), not all the budget allows, and half that in
    passes over maps above the lowest resolution; the result is as exact, and the two passes of each split
    residual block cut its maps into the same tiles (the first pass's halo is one convolution's)."""
    from styleshift import tiling

    sizes, grids, scales, budgets = [], [], [], []
    real_spans, real_pass, real_fitting = tiling.spans, tiling.Tiler._pass, tiling.fitting_tile

    def spy_spans(length, tile, align):
        sizes.append(tile)
        return real_spans(length, tile, align)

    def spy_pass(self, source, first, scale, *args, tail=None, **kwargs):
        scales.append(scale)
        out = real_pass(self, source, first, scale, *args, tail=tail, **kwargs)
        shape, rows, columns = self._grid
        grids.append((tail is not None, (shape, tuple(rows), tuple(columns))))
        return out

    def spy_fitting(plan, per_pixel, halo, budget):
        budgets.append(budget)  # the memory the pass's tiles may take
        return real_fitting(plan, per_pixel, halo, budget)

    monkeypatch.setattr(tiling, "spans", spy_spans)
    monkeypatch.setattr(tiling.Tiler, "_pass", spy_pass)
    monkeypatch.setattr(tiling, "fitting_tile", spy_fitting)
    budget = 1 << 30  # everything fits: only the cap limits the tiles
    tiles = {}
    # ngf 8 and 3 MiB: 370 px tiles in the residual blocks, above 32 of their halos
    for dtype, cap in ((torch.float32, 3 << 20), (torch.bfloat16, 3 << 20), (torch.float32, 6 << 20)):
        monkeypatch.setattr(tiling, "CPU_TILE_MEMORY", cap)
        layout = torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format  # as the Stylizer
        net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2), seed=1)
        net = net.to(dtype=dtype, memory_format=layout)
        plan = make_plan(net)
        x = padded(photo(512, 640)).to(dtype=dtype, memory_format=layout)
        sizes.clear(), grids.clear(), scales.clear(), budgets.clear()
        with torch.inference_mode():
            whole = net(x).float()
            tiled = tiled_forward(net, x, plan, None, budget).float()
        assert psnr(whole, tiled) >= (100 if dtype == torch.float32 else 38)  # bf16: both rounded, differently
        if cap == 3 << 20:  # (ngf 8: the cap, not 32 halos, sets every pass's tile memory)
            each = cap * dtype.itemsize / 4
            assert set(scales) == {1, 2, plan.stride}
            assert all(b == (each if s == plan.stride else each / 2) for s, b in zip(scales, budgets, strict=True))
        tiles[dtype, cap] = list(sizes)  # each pass's tile side (in its own pixels)
        tails = [k for k, (tail, _) in enumerate(grids) if tail]
        assert len(tails) == 2
        trunk = {grid for _, grid in grids[tails[0] - 1:tails[-1] + 1]}
        if cap == 3 << 20:  # (with 6 MiB, tiles that `spans` does not even out into one tiling)
            assert len(trunk) == 1 and len(next(iter(trunk))[1]) > 1  # one tiling, block to block, of several
    small, large = tiles[torch.float32, 3 << 20], tiles[torch.float32, 6 << 20]
    assert max(small) < max(x.shape[-2:])  # the picture, which would fit the budget whole, was cut into tiles
    assert max(large) > max(small)  # ... as large as the cap allows
    assert tiles[torch.bfloat16, 3 << 20] == small  # bf16: tiles of as many pixels, in half the memory


def test_residual_blocks_reuse_one_spare_map():
    """Each residual block after the first keeps its first norm's input in the map the block before it freed,
    rather than a new one (a fragmented heap then grows by a map)."""
    from styleshift.tiling import Tiler

    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=4), seed=3)
    plan = make_plan(net)
    x = padded(photo(200, 160))
    budget = budget_for(plan, x, 2)
    tiler, fresh = Tiler(plan, 32, budget), []
    real_buffer = tiler._buffer

    def spy_buffer(shape, like, source=None):
        spare = tiler._spare
        out = real_buffer(shape, like, source)
        fresh.append(out is not spare)
        return out

    tiler._buffer = spy_buffer
    with torch.inference_mode():
        whole = net(x)
        tiled = tiler(x)
    assert psnr(whole, tiled) >= 100
    blocks = sum(t is not None for t in plan.tails)
    assert blocks == 4 and len(fresh) - sum(fresh) == blocks - 1


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_channels_last_maps_go_over_the_maps_they_replace(variant, monkeypatch):
    """In channels-last layout (bf16 on a CPU) a kept map of another size goes over the memory of the one it
    replaces: the encoder's downsampling writes top down over its input, the decoder's upsampling bottom up
    over the trunk and the residual blocks' second map, which lies past the trunk's end. Every map then lives
    in the memory of the first one, and the result is still exact (fp32 here, to see exactness)."""
    from styleshift import tiling

    net = perturbed(GeneratorConfig(ngf=8, **variant), seed=2).to(memory_format=torch.channels_last)
    plan = make_plan(net)
    x = padded(photo(200, 168, 3)).contiguous(memory_format=torch.channels_last)
    budget = 1 << 30  # room to keep the encoder's and decoder's maps, so that each layer runs once
    orders, memory = [], []
    real_overlay, real_pass = tiling._overlay, tiling.Tiler._pass

    def spy_overlay(*args):
        orders.append(real_overlay(*args))
        return orders[-1]

    def spy_pass(self, source, *args, **kwargs):
        out = real_pass(self, source, *args, **kwargs)
        if out is not None and out.shape[-2:] != x.shape[-2:]:
            memory.append(out.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(tiling, "_overlay", spy_overlay)
    monkeypatch.setattr(tiling.Tiler, "_pass", spy_pass)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_forward(net, x, plan, 32, budget)
    assert psnr(whole, tiled) >= 100
    assert "down" in orders and "up" in orders
    assert len(memory) > 3 and len(set(memory)) == 1  # every map below full size in one piece of memory


def test_a_pass_whose_result_cannot_go_over_its_source_takes_whole_tiles(monkeypatch):
    """Strips are cut short only for results waiting to go over their source: where _overlay finds no order,
    the pass runs in tiles of the full size (fewer of them), and the result is still exact."""
    from styleshift import tiling

    net = perturbed(GeneratorConfig(ngf=8, **VARIANTS[0]), seed=2).to(memory_format=torch.channels_last)
    plan = make_plan(net)
    x = padded(photo(200, 168, 3)).contiguous(memory_format=torch.channels_last)
    real_overlay, real_run = tiling._overlay, tiling.Tiler._run
    tiles = {}
    for refused in (False, True):
        monkeypatch.setattr(tiling, "_overlay", (lambda *a: None) if refused else real_overlay)
        runs = []
        monkeypatch.setattr(tiling.Tiler, "_run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
        with torch.inference_mode():
            assert psnr(net(x), tiled_forward(net, x, plan, None, 4 << 20)) >= 100  # budget-sized tiles
        tiles[refused] = len(runs)
    assert tiles[True] < tiles[False]


def test_overlay_order_keeps_every_row_a_later_strip_reads():
    """_overlay allows writing a result over its source only in a strip order where no strip's result lands on
    source rows a later strip's tiles (with their halos) still read."""
    from styleshift.tiling import _overlay

    def source(c, h, w, extra=0):
        memory = torch.empty(1 * c * h * w + extra)
        return memory.as_strided((1, c, h, w), (c * h * w, 1, w * c, c))

    rows = spans(64, 16, 2)
    half = (1, 16, 32, 32)  # downsampling, with twice the channels: half the memory of its source
    assert _overlay(source(8, 64, 64), half, rows, halo=2) == "down"
    assert _overlay(source(8, 64, 64), half, rows, halo=9) is None  # the next strip reads rows written
    double = (1, 4, 128, 128)  # upsampling: twice the memory, so only over a source with room past its end
    assert _overlay(source(8, 64, 64), double, rows, halo=1) is None
    assert _overlay(source(8, 64, 64, extra=8 * 64 * 64), double, rows, halo=1) == "up"
    assert _overlay(source(8, 64, 64, extra=8 * 64 * 64), double, rows, halo=17) is None
    same = (1, 8, 64, 64)  # same size, with a halo: no order works (in-place passes copy rows aside instead)
    assert _overlay(source(8, 64, 64), same, rows, halo=1) is None
    assert _overlay(source(8, 64, 64), same, rows, halo=0) == "down"


def test_tile_statistics_add_up_to_the_whole_maps():
    """A norm's statistics, added up over tile cores a few rows at a time, are the whole map's: a photo's
    features after a generator's first convolution, in fp32 (NCHW) and bf16 (channels-last), cut into cores
    read through strided windows, whose heights are no multiple of a chunk's rows, the later ones narrower
    (they reuse a larger scratch)."""
    from styleshift.tiling import NormStats

    net = perturbed(GeneratorConfig(ngf=16), seed=2)
    with torch.inference_mode():
        features = net.model[:2](photo(600, 203))  # reflection pad, 7 x 7 convolution: 16 channels
    for dtype, layout in ((torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)):
        m = features.to(dtype=dtype, memory_format=layout)
        window = torch.nn.functional.pad(m, (3, 4, 5, 6))  # cores are views into a larger map, as in tiles
        h, w = m.shape[-2:]
        stats = NormStats((torch.nn.InstanceNorm2d(16),))
        stats.measure(0)
        for (r0, r1), (c0, c1) in (((0, 350), (0, w)), ((350, h), (0, 100)), ((350, h), (100, w))):
            stats._add_up(window[..., 5 + r0:5 + r1, 3 + c0:3 + c1])
        stats._add_up(window[..., 5:5, 3:3 + w])  # an empty core adds nothing
        stats.finish()
        var, mean = torch.var_mean(m.double(), dim=(0, 2, 3), correction=0)
        got_mean, got_var = (t.double() for t in stats.stats[0])
        assert torch.allclose(got_mean, mean, rtol=2e-6, atol=2e-7)
        assert torch.allclose(got_var, var, rtol=2e-6, atol=1e-8)


def test_only_elementwise_layers_are_applied_rows_at_a_time():
    """The layers before the first residual block are applied to the checkpoint a few rows at a time only
    when each pixel's result depends on that pixel alone: activations and the instance norms that tiling
    fixes to whole-picture statistics, not norms that would take statistics of the rows at hand, nor pads."""
    from torch import nn

    from styleshift.tiling import _elementwise

    net = build_generator(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2))
    plan = make_plan(net)
    first = plan.norm_layer[2]  # the encoder's last norm, a layer of its own, then its ReLU
    assert _elementwise(plan.layers[first:first + 2], plan.norms)
    assert not _elementwise(nn.Sequential(nn.GroupNorm(2, 8), nn.ReLU()), plan.norms)
    assert not _elementwise(nn.Sequential(nn.InstanceNorm2d(8), nn.ReLU()), plan.norms)  # not one of the plan's
    assert not _elementwise(nn.Sequential(nn.ReflectionPad2d(1)), plan.norms)
    assert not _elementwise(nn.Sequential(nn.Dropout(0.5).train()), plan.norms)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("tile", [0, 64], ids=["whole", "tiled"])
def test_pictures_convert_by_tiles_or_strips_to_the_same_pixels(tile, bits, precision, monkeypatch):
    """Stylizer.stylize converts pixels to the network's input and its output back to pixels a tile (or a strip)
    at a time, handing the tiler the picture itself (no float copy of a large picture): the same pixels as the
    whole-tensor route, for 8- and 16-bit pictures whose sides need padding, and photo blending still works."""
    from styleshift import stylizer as module
    from styleshift.stylizer import _to_pixels

    top, dtype = (255.0, np.uint8) if bits == 8 else (65535.0, np.uint16)
    cfg = GeneratorConfig(arch="resnet_6blocks", ngf=8, n_blocks=2)
    net = perturbed(cfg, seed=2)
    style = Style(cfg, {"forward": net.state_dict(), "inverse": net.state_dict()})
    pixels = ((photo(149, 203) + 1) * top / 2).round()[0].permute(1, 2, 0).numpy().astype(dtype)
    s = Stylizer(style, device="cpu", precision=precision, tile_size=tile)
    with torch.inference_mode():
        x = torch.from_numpy(pixels.astype(np.int32)).permute(2, 0, 1)[None].float().mul_(2 / top).sub_(1)
        expected = _to_pixels(s.stylize_tensor(x), top)[0].permute(1, 2, 0).numpy().astype(dtype)
    given = []
    real = module.tiled_forward
    monkeypatch.setattr(module, "tiled_forward", lambda net, x, *a: given.append(x.dtype) or real(net, x, *a))
    out = s.stylize(pixels)
    assert out.dtype == dtype and out.flags.c_contiguous and np.array_equal(out, expected)
    assert given == ([] if tile == 0 else [torch.uint8 if bits == 8 else torch.uint16])
    half = Stylizer(style, device="cpu", precision=precision, tile_size=tile, strength=0.5).stylize(pixels)
    assert np.abs(half.astype(float) - (pixels.astype(float) + out) / 2).max() <= 1.0  # the lerp, rounded


def test_a_block_followed_by_an_in_place_activation_still_splits():
    """make_plan checks whether each residual block splits on its probe output: a ReLU(inplace=True) after
    the last block, which changes that output in place, must not make it lose its split."""
    from torch import nn

    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2))
    layers = list(net.model)
    last = max(k for k, t in enumerate(make_plan(net).tails) if t is not None)
    changed = nn.Sequential(*layers[:last + 1], nn.ReLU(inplace=True), *layers[last + 1:])
    plan = make_plan(changed)
    assert plan.tails[last] is not None and sum(t is not None for t in plan.tails) == 2
    x = padded(photo(96, 120))
    budget = budget_for(plan, x, 2)
    with torch.inference_mode():
        assert psnr(changed(x), tiled_forward(changed, x, plan, 32, budget)) >= 100


def test_pads_inside_the_picture_are_left_out_and_tiles_stay_exact(monkeypatch):
    """Passes made of pad-and-convolution pairs pad a tile only where its window meets the picture's border
    (reflection, replication and zero pads alike); the result is still the untiled one. A residual block whose
    first norm's input is not its chain's head (a skip inside) is not split, and stays exact too."""
    from torch import nn

    from styleshift import tiling

    class HeadSkip(nn.Module):  # x + tail(y), but y = conv(pad(x)) + x: not the head of its chain
        def __init__(self, c):
            super().__init__()
            self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
                                       nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

        def forward(self, x):
            return x + self.block[2:](self.block[1](self.block[0](x)) + x)

    torch.manual_seed(0)
    net = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 8, 7), nn.InstanceNorm2d(8), nn.ReLU(),
                        nn.ReplicationPad2d(1), nn.Conv2d(8, 8, 3), nn.InstanceNorm2d(8), nn.ReLU(),
                        HeadSkip(8), nn.ZeroPad2d(1), nn.Conv2d(8, 8, 3), nn.InstanceNorm2d(8), nn.ReLU(),
                        nn.ReflectionPad2d(1), nn.Conv2d(8, 3, 3), nn.Tanh())
    plan = make_plan(net)
    assert plan.tails[8] is None
    kept = []  # the widths each pad kept: (left, right, top, bottom)
    pad = tiling.Tiler._pad

    def counting(self, module, x):
        y = pad(self, module, x)
        kept.append((type(module).__name__, tuple(y.shape[-2:]) != tuple(x.shape[-2:])))
        return y

    monkeypatch.setattr(tiling.Tiler, "_pad", counting)
    x = padded(photo(96, 120))
    with torch.inference_mode():
        assert torch.allclose(tiled_forward(net, x, plan, 32, 1 << 30), net(x), atol=1e-5)
    for name in ("ReflectionPad2d", "ReplicationPad2d", "ZeroPad2d"):
        assert (name, True) in kept and (name, False) in kept  # border tiles padded, inner tiles not


def test_norms_right_after_a_convolution_normalise_its_output_in_place(monkeypatch):
    """A norm that directly follows a convolution in a chain normalises the tile's fresh convolution output in
    place (no second tile-sized block); never a window of a map the tiler keeps. The result stays exact."""
    from styleshift import tiling

    net = perturbed(GeneratorConfig(ngf=8, **VARIANTS[0]))
    plan = make_plan(net)
    calls = []
    forward = tiling.NormStats._forward

    def watching(self, i, m, x):
        y = forward(self, i, m, x)
        calls.append(y is x)
        return y

    monkeypatch.setattr(tiling.NormStats, "_forward", watching)
    x = padded(photo())
    budget = budget_for(plan, x, 2)
    with torch.inference_mode():
        assert torch.allclose(tiled_forward(net, x, plan, 32, budget), net(x), atol=1e-5)
    assert any(calls) and not all(calls)


def test_odd_layouts_stay_exact_with_pads_left_out_and_norms_in_place():
    """Networks the inner pads and in-place norms must not mistake for plain chains, all still exact, the
    caller's input untouched and no patched method left behind: residual blocks inside a plain chain (x + f(x)
    nested one level down), a pad followed by an in-place activation before its convolution, a block that
    keeps a convolution's output for its skip, and one pad module used three times (in one pass: estimated
    statistics)."""
    from torch import nn

    class Block(nn.Module):  # x + f(x), inside an nn.Sequential
        def __init__(self, c):
            super().__init__()
            self.f = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
                                   nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

        def forward(self, x):
            return x + self.f(x)

    class ConvSkip(nn.Module):  # y = conv(pad(x)); y + rest(y): the norm after the convolution must not overwrite y
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(),
                                      nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3))

        def forward(self, x):
            y = self.body[1](self.body[0](x))
            return y + self.body[2:](y)

    def head(c=8):
        return [nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c), nn.ReLU()]

    def tail(c=8):
        return [nn.ReflectionPad2d(1), nn.Conv2d(c, 3, 3), nn.Tanh()]

    pad = nn.ReflectionPad2d(1)
    nets = {
        "nested blocks": (nn.Sequential(*head(), nn.Sequential(Block(8), Block(8)), *tail()), 1 << 30),
        "pad, in-place activation, convolution": (nn.Sequential(
            nn.ReflectionPad2d(1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8),
            nn.ReLU(), *tail()), 1 << 30),
        "convolution output kept for a skip": (nn.Sequential(*head(), ConvSkip(8), nn.InstanceNorm2d(8), nn.ReLU(),
                                                             *tail()), 1 << 30),
        "one pad three times": (nn.Sequential(pad, nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8), nn.ReLU(), pad,
                                              nn.Conv2d(8, 8, 3), nn.InstanceNorm2d(8), nn.ReLU(), pad,
                                              nn.Conv2d(8, 3, 3), nn.Tanh()), None),
    }
    x = padded(photo(96, 120))
    for name, (net, budget) in nets.items():
        torch.manual_seed(0)
        plan = make_plan(perturb(net))
        if budget is None:  # statistics from a downscaled copy, all in one pass: close, not equal
            budget = int(plan.checkpoint_bytes_per_pixel * x.shape[-2] * x.shape[-1] / 0.75) // 2
        given = x.clone()
        with torch.inference_mode():
            tiled, whole = tiled_forward(net, given, plan, 32, budget), net(x.clone())
        assert torch.equal(given, x), name
        assert psnr(whole, tiled) >= (20 if budget < 1 << 30 else 100), name
        assert not [m for m in net.modules() if "forward" in m.__dict__], name


def test_a_tile_holds_no_earlier_tile_and_runs_pointwise_layers_in_place_on_its_own_copy():
    """While a tile runs, the tile before it is let go (its result is copied where it belongs already); a tile
    whose window had to be copied runs its leading pointwise layers (norm, ReLU) in place on that copy, so the
    convolution after them reads the copy itself, not a second tile-sized block. The result stays exact."""
    import weakref

    from torch import nn

    from styleshift.tiling import Tiler

    net = perturbed(GeneratorConfig(ngf=8, arch="resnet_6blocks", n_blocks=2))
    plan = make_plan(net)
    x = padded(photo(200, 160))
    tiler = Tiler(plan, 32, 1 << 30)  # memory enough to keep each norm's input: the encoder runs once
    run, last, held = tiler._run, [], []

    def watched_run(*args, **kwargs):
        held.append(bool(last) and last[-1]() is not None)  # the previous tile's result, still alive?
        core = run(*args, **kwargs)
        if core is not None:
            last.append(weakref.ref(core))
        return core

    tiler._run = watched_run
    # The encoder's last downsampling pass starts on a window of the kept map: norm, ReLU, strided convolution.
    layers = list(net.model)
    norm = next(m for m in layers[4:] if isinstance(m, nn.InstanceNorm2d))
    conv = layers[layers.index(norm) + 2]
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2)
    storage, same = {}, []
    hooks = [norm.register_forward_pre_hook(lambda m, a: storage.update(norm=a[0].untyped_storage().data_ptr())),
             conv.register_forward_pre_hook(lambda m, a: same.append(
                 storage.pop("norm", None) == a[0].untyped_storage().data_ptr()))]
    try:
        with torch.inference_mode():
            tiled = tiler(x)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.inference_mode():
        assert psnr(net(x), tiled) >= 100
    assert len(held) > 10 and not any(held)
    assert same and all(same)
