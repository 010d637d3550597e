"""Native-resolution inference in bounded memory, without seams.

Why plain tiling leaves seams: instance normalisation (Ulyanov et al. 2016) standardises each channel by
the mean and variance of that channel over the whole feature map,

    y = (x - mu_c) / sqrt(var_c + eps),   mu_c, var_c over all H x W positions,

so a generator run on tiles normalises each tile by its own statistics and neighbouring tiles come out in
different tones. Here every normalisation layer uses the statistics of the *whole* picture, and the tiled
result equals the untiled one up to float rounding.

Tiles. Each tile runs with a halo as wide as the receptive-field radius of the layers it runs (88 input px
for the 9-block ResNet), so the pixels its own reflection pads corrupt at interior edges are all discarded;
the exact cores are placed side by side, no blending. (Passes made of pad-and-convolution pairs, the residual
blocks', leave those pads out at interior edges instead: Tiler._inner_pads.) Tiles touching the picture's
border start exactly there, so the network's reflection pads reflect at the true border as in the untiled
run, and every tile corner sits on a multiple of the total stride, so each subsampling keeps its phase.

Statistics, exactly. Layer m's statistics depend on the output of every layer before it, normalised with
*their* whole-picture statistics, so they are measured in order: a tiled pass runs the layers up to norm m
(earlier norms fixed to their statistics), merges each tile core's count, mean and variance into running
whole-picture ones (fp64, Chan et al. 1979), and stops there. Re-running from the input for every norm
would cost about (number of norms)/2 forwards, so the passes start from a *checkpoint*: the whole picture's features
after the last top-level layer at the lowest resolution (1/4 scale, 4ngf channels: 64 bytes per input pixel
for ngf 64) whose norms are all known. Each pass also moves the checkpoint forward, written in place tile by
tile (the rows and columns later tiles still read are copied aside first). For a ResNet generator a block is then
run twice in total (once to measure its second norm, once to move the checkpoint across it while measuring
the next block's first norm), about 2x a plain forward's arithmetic. When a second checkpoint-sized buffer
fits too, a residual block x + norm2(tail(y)) (checked on a probe; y is its first norm's input) runs as two
passes: one keeps y while norm1 is measured, the next runs the tail (norm1, ReLU, pad, conv, up to norm2)
on tiles of y with a one-convolution halo, measures norm2 and writes its input z over y; then x += norm2(z)
in place. Each convolution then runs once (before the first block, the encoder's last norm and ReLU are
applied to the checkpoint in place, rows at a time, to make it the block's input). (A block whose chain
cannot be split keeps z only: its first convolution runs twice, about 1.5x.) Likewise a norm that is a
layer of its own keeps its input, which becomes the next checkpoint, so the encoder and decoder run once
where their larger maps fit. Measured on one CPU thread, fp32, before the split blocks: ResNet-9 ngf 64 on
a 1024 x 1024 photo mosaic, 27.6 s tiled vs 15.8 s whole (1.75x), PSNR 129 dB (largest difference 9e-6).
In bf16 (styleshift.stylizer on CPUs with bf16 units) the buffers take half the bytes; ResNet-9 at
1536 x 2048 on a 2-core AVX512-BF16 CPU: 1.18x the time of a whole forward (8.1 vs 6.8 s in one run) at
1.2 instead of 2.2 GiB peak then (0.8 GiB now, see Tiler.__call__). Memory: the checkpoint(s) plus one tile's
forward, whatever the picture's size.
In channels-last layout (bf16 on a CPU) the kept maps share one piece of memory: the encoder's last
downsampling writes its map over the one it reads (top down, strip by strip), the first residual block's
second buffer is the rest of that memory, and the decoder's first upsampling writes over the trunk and that
buffer (bottom up). ResNet-9 at 1536 x 2048 then holds at most 192 MiB of maps, not 288 (see _overlay).

When even the checkpoint exceeds three quarters of the memory budget (beyond about 4.7 megapixels for ngf 64
in fp32, 9.4 in bf16, with the default CPU budget), the statistics are instead taken once on a copy of the
picture downscaled (area average) to fit: still seamless, since every tile uses the same statistics, but no
longer equal to the untiled output (random-weight ResNet-9 on a 1024 px photo mosaic: 27.8 dB PSNR with
statistics from a 756 px copy, 24.6 dB from 308 px). Re-measuring such estimates at full resolution
(fixed-point iteration) made them worse, not better, so it is not offered.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .heap import keep_freed_memory, trim

Pixelwise = Callable[[torch.Tensor], torch.Tensor]  # computes each pixel from that pixel alone

# Working memory allowed by default on a CPU, beyond the picture and its result. Fixed rather than "all that
# is free": a 1536 x 2048 picture should take a quarter of a plain forward's memory, not whatever the
# machine happens to have, so that several processes (or a desktop) can run side by side.
CPU_WORKING_MEMORY = 384 * 2**20

# ... of which a tile takes no more than this on a CPU in fp32 (half in bf16: tiles of as many pixels), unless
# its halo needs more to stay a small part of it (see Tiler._pass): larger tiles run no faster there, and
# only leave larger holes in the heap.
CPU_TILE_MEMORY = 64 * 2**20

# Modules that compute each pixel from that pixel alone, and those that also pad or take statistics: neither
# widens a receptive field.
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Identity)
PADS = (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d, nn.ConstantPad2d)
POINTWISE = (*ELEMENTWISE, nn.Dropout, nn.InstanceNorm2d, nn.GroupNorm, nn.BatchNorm2d, *PADS)
PADS_AND_CONVS = (*PADS, nn.Conv2d, nn.ConvTranspose2d)


@dataclass(frozen=True)
class Plan:
    """What tiling a generator needs to know, measured once on a small probe input."""

    layers: nn.Sequential  # the generator as a sequence of top-level layers
    reach: tuple[float, ...]  # per layer: receptive-field radius it adds, in input pixels
    scale: tuple[float, ...]  # per layer: input pixels per pixel of its output (a power of two)
    norm_layer: tuple[int, ...]  # per instance-norm module, in execution order: the layer holding it
    norms: tuple[nn.Module, ...]
    stride: int  # total downsampling factor; tile corners sit on multiples of it
    bytes_per_pixel: float  # peak working memory of a forward, per input pixel
    layer_bytes_per_pixel: tuple[float, ...]  # the same for each layer alone
    out_bytes_per_pixel: tuple[float, ...]  # each layer's output, per input pixel (in `dtype`)
    checkpoint_bytes_per_pixel: float  # the largest lowest-resolution layer output, per input pixel
    out_channels: int
    # per layer: True when it computes x + norm(z) with its last instance norm last (a residual block), so
    # once that norm's input z is stored its output is a pointwise update of x
    residual: tuple[bool, ...] = ()
    dtype: torch.dtype = torch.float32  # the network's: feature maps take its itemsize per value
    # per layer: for a residual block x + chain(x) with two norms whose first norm's input y has x's shape,
    # the chain from that norm on and its reach in input pixels, so the block's output is x + norm(tail(y))
    tails: tuple[tuple[nn.Sequential, float] | None, ...] = ()
    # per norm: the reach, in input pixels, of the leaves of its layer that run before it (a pass that stops
    # at a residual block's first norm needs the halo of one convolution, not of the block's two)
    norm_reach: tuple[float, ...] = ()

    @property
    def halo(self) -> int:
        return self.halo_between(0, len(self.layers) - 1)

    def channels(self, layer: int) -> int:
        """The channels of layer `layer`'s output."""
        return round(self.out_bytes_per_pixel[layer] * self.scale[layer] ** 2 / self.dtype.itemsize)

    def halo_between(self, first: int, last: int) -> int:
        """Receptive-field radius of layers first..last, in input pixels, up to a multiple of the stride."""
        return math.ceil(sum(self.reach[first:last + 1]) / self.stride) * self.stride


def _radius(module: nn.Module, grows: bool) -> float:
    """How far (in the module's input pixels) an output pixel reaches from its own position."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        # Output o gathers inputs i with o = i * s - p + k * d: within ceil((d (K-1) / 2 + 1) / s) of o / s.
        k, s, d = max(module.kernel_size), min(module.stride), max(module.dilation)
        return math.ceil((d * (k - 1) / 2 + 1) / s)
    if hasattr(module, "kernel_size"):  # convolutions and pools
        ks = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
        dil = getattr(module, "dilation", 1)
        dil = dil if isinstance(dil, tuple) else (dil,)
        return max(math.ceil(d * (k - 1) / 2) for k, d in zip(ks, dil * len(ks)))
    kernel = getattr(module, "kernel", None)
    if isinstance(kernel, torch.Tensor):  # a fixed filter (Blur)
        return max(kernel.shape[-2:]) // 2
    if grows:  # nearest / bilinear resizing, pixel shuffle: neighbours at the coarse scale
        return 1
    if isinstance(module, POINTWISE) or not any(True for _ in module.parameters(recurse=False)):
        return 0  # pointwise, padding, or parameter-free decimation (Subsample)
    raise ValueError(f"tiling: cannot tell the receptive field of {type(module).__name__}; use tile_size=0")


def _scale(probe: int, side: int) -> float:
    """Input pixels per feature pixel, a power of two: a padded map (70 px for 64) is still at scale 1."""
    return 2.0 ** round(math.log2(probe / side))


def as_layers(net: nn.Module) -> nn.Sequential | None:
    """The generator's top-level sequence: the net itself, or its one Sequential child holding every layer
    (styleshift's generators keep theirs in `.model`)."""
    if isinstance(net, nn.Sequential):
        return net
    children = list(net.children())
    return children[0] if len(children) == 1 and isinstance(children[0], nn.Sequential) else None


@torch.inference_mode()
def make_plan(net: nn.Module, in_channels: int = 3, probe: int = 64) -> Plan:
    """Run the network's layers on a probe input, hooking every leaf module: a layer's reach is the sum of
    its leaves' radii times their input's scale (input pixels per feature pixel), an upper bound that is
    exact for chains and for residual blocks (the skip adds no reach); memory is the largest input + output
    of any leaf, plus a quarter for what stays alive beside it (residual inputs)."""
    layers = as_layers(net)
    if layers is None:
        raise ValueError(f"tiling: {type(net).__name__} is not a sequence of layers; use tile_size=0")
    param = next(net.parameters(), None)
    if param is not None and param.dtype != torch.float32:
        return _low_precision_plan(net, layers, param.dtype, in_channels, probe)
    # Random, not zeros: a freshly initialised net (zero biases) maps zeros to zeros, proving nothing below.
    x = torch.randn(1, in_channels, probe, probe, generator=torch.Generator().manual_seed(0))
    x = x.to(param.device if param is not None else "cpu")
    leaves, norms, current = [], [], [0]  # norms: (layer, module, its input) in execution order
    before_norm = []  # per norm: how many leaves had run when it did (itself included)

    def on_leaf(m, i, o):  # returns None: a forward hook's return value would replace the output
        if current[0] is not None:  # None: a residual block's check runs its layers again (below)
            leaves.append((current[0], m, i[0].shape, o.shape))

    def on_norm(m, i, o):
        if current[0] is not None:
            norms.append((current[0], m, i[0]))
            before_norm.append(len(leaves))

    hooks = [m.register_forward_hook(on_leaf) for m in layers.modules() if next(m.children(), None) is None]
    hooks += [m.register_forward_hook(on_norm) for m in layers.modules() if isinstance(m, nn.InstanceNorm2d)]
    try:
        h, scales, residual, out_bytes, tails = x, [], [], [], []
        for k, layer in enumerate(layers):
            current[0] = k
            before, calls = h, len(leaves)
            h = layer(h)
            scales.append(_scale(probe, h.shape[-1]))
            out_bytes.append(4 * h.numel() / probe**2)
            norm, z = next(((m, y) for j, m, y in reversed(norms) if j == k), (None, None))  # its last norm
            residual.append(norm is not None and leaves[-1][1] is norm and len(leaves) > calls
                            and h.shape == before.shape == z.shape
                            and torch.allclose(h, before + F.instance_norm(z, eps=norm.eps), atol=1e-5)
                            and not norm.affine)
            # Checked now, while `h` is still the block's output: a layer after it may work in place
            # (ReLU(inplace=True)). (Copying every layer's probe output to check them at the end shifted the
            # heap: 1536 x 2048 bf16 peaks of 944-1025 MiB over 12 processes, against 902-1021 without copies.)
            current[0] = None
            tails.append(_tail(layer, [(m, y) for j, m, y in norms if j == k], before, h, scales[k])
                         if residual[k] else None)
    finally:
        for hook in hooks:
            hook.remove()
    if h.shape[-1] != probe or not torch.allclose(h, net(x), atol=1e-5):
        raise ValueError(f"tiling: {type(net).__name__} is not the sequence of its layers; use tile_size=0")
    reach, peak, radii = [0.0] * len(layers), [0.0] * len(layers), []
    for k, m, i, o in leaves:
        radii.append(_radius(m, o[-1] >= 1.5 * i[-1]) * _scale(probe, i[-1]))
        reach[k] += radii[-1]
        peak[k] = max(peak[k], 1.25 * (math.prod(i) + math.prod(o)) * 4 / probe**2)
    norm_reach = tuple(sum(r for (j, *_), r in zip(leaves[:n], radii) if j == k)
                       for (k, _, _), n in zip(norms, before_norm))
    stride = round(max(scales))
    checkpoint = max((b for b, s in zip(out_bytes, scales) if s == stride), default=0.0)
    return Plan(layers, tuple(reach), tuple(scales), tuple(k for k, _, _ in norms), tuple(m for _, m, _ in norms),
                stride, max(peak), tuple(peak), tuple(out_bytes), checkpoint, h.shape[1], tuple(residual),
                tails=tuple(tails), norm_reach=norm_reach)


def _tail(block: nn.Module, norms: list, before: torch.Tensor, after: torch.Tensor,
          scale: float) -> tuple[nn.Sequential, float] | None:
    """For a residual block whose chain holds two norms, the second one last: the chain from the first norm on
    and its reach, when the block's output on the probe is its input plus that tail of the first norm's
    input y, y is the chain before that norm applied to the input, and y has the input's shape (so the tail's
    result can be written over y)."""
    chain = as_layers(block)
    if chain is None or len(norms) != 2 or chain[-1] is not norms[1][0] or norms[0][1].shape != before.shape:
        return None
    start = next((j for j, m in enumerate(chain) if m is norms[0][0]), None)
    if start is None:
        return None
    tail = nn.Sequential(*chain[start:])
    if not (torch.allclose(norms[0][1], nn.Sequential(*chain[:start])(before.clone()), atol=1e-5)
            and torch.allclose(after, before + tail(norms[0][1]), atol=1e-5)):
        return None
    reach = sum(_radius(m, False) for m in tail.modules() if next(m.children(), None) is None) * scale
    return tail, reach


def _low_precision_plan(net: nn.Module, layers: nn.Sequential, dtype: torch.dtype, in_channels: int,
                        probe: int) -> Plan:
    """The plan of a bf16/fp16 network: probed on an fp32 copy, whose checks compare results to 1e-5 (bf16
    rounding would fail them), then pointed back at this network's own modules, with byte counts for its
    itemsize."""
    copy = deepcopy(net).float()
    plan = make_plan(copy, in_channels, probe)
    name_of = {id(m): name for name, m in copy.named_modules()}
    own = dict(net.named_modules())

    def ours(modules):
        return tuple(own[name_of[id(m)]] for m in modules)

    k = dtype.itemsize / 4
    tails = tuple(None if t is None else (nn.Sequential(*ours(t[0])), t[1]) for t in plan.tails)
    return replace(plan, layers=layers, norms=ours(plan.norms), dtype=dtype, tails=tails,
                   bytes_per_pixel=plan.bytes_per_pixel * k,
                   layer_bytes_per_pixel=tuple(b * k for b in plan.layer_bytes_per_pixel),
                   out_bytes_per_pixel=tuple(b * k for b in plan.out_bytes_per_pixel),
                   checkpoint_bytes_per_pixel=plan.checkpoint_bytes_per_pixel * k)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors now: free GPU memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def working_memory(device: torch.device, free: int | None = None) -> int:
    """The default budget: on a GPU half of what is free; on a CPU a fixed share, less when memory is short.
    free: available_memory(device), where the caller has it already."""
    free = available_memory(device) if free is None else free
    if device.type == "cuda":
        return free // 2
    return min(CPU_WORKING_MEMORY, free // 4)


# Pictures whose whole forward needs at most this much run whole even beyond the tiles' budget: exact tiling
# costs time (halos, statistics passes, copies: 1.2x a whole forward for ResNet-9 at 1536 x 2048 in bf16),
# worth paying only where memory matters. 1 GiB (estimated) covers a ResNet-9 at 1024 x 1024 (0.35 GiB in
# bf16, 0.7 in fp32: measured peaks run higher, and higher again where styleshift.stylizer lets the forward
# keep its freed memory).
CPU_WHOLE_PICTURE = 1 << 30


def whole_picture_limit(device: torch.device, free: int | None = None) -> int:
    free = available_memory(device) if free is None else free
    if device.type == "cuda":
        return free // 2
    return min(CPU_WHOLE_PICTURE, free // 4)


def choose_tile_size(height: int, width: int, plan: Plan, budget: int, whole_limit: int = 0) -> int:
    """The tile side for a picture (0: it runs whole, as it does when its forward fits `budget` or
    `whole_limit`). The largest multiple of the stride whose tile and halo fit `budget`; never below the
    stride or the halo, which would make tiling pointless."""
    if plan.bytes_per_pixel * height * width <= max(budget, whole_limit):
        return 0
    return fitting_tile(plan, plan.bytes_per_pixel, plan.halo, budget)


def fitting_tile(plan: Plan, bytes_per_pixel: float, halo: int, budget: int) -> int:
    side = math.sqrt(budget / bytes_per_pixel) - 2 * halo
    return max(plan.stride, halo, int(side) // plan.stride * plan.stride)


class Stop(Exception):
    """Raised by the norm being measured: the layers after it are not needed in this pass."""


class NormStats:
    """Per-channel statistics of every instance-norm layer (fp32), and the patching that makes the layers
    use them: norms before `measuring` normalise with their statistics; norm `measuring` adds up its input
    over the tile's core and stops the pass (see the module docstring)."""

    def __init__(self, norms: tuple[nn.Module, ...], after_conv: dict[int, nn.Module] | None = None) -> None:
        self.norms = norms
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(norms)
        self.measuring: int | None = None
        self.core: tuple[float, float, float, float] = (0, 1, 0, 1)  # fractions of the tile: top, bottom, left, right
        self.sums: list = [0.0, 0.0, 0]
        self.keep, self.kept = False, None  # whether to keep the measured norm's input (core of the tile)
        self.scratch = torch.empty(0)  # _add_up's fp32 chunks, reused from tile to tile
        self.after_conv = after_conv or {}  # norm -> the convolution right before it in a chain (_after_conv)
        self.fresh: dict[int, torch.Tensor] = {}  # norm -> that convolution's last output, until the norm runs
        self.hooks: list = []

    def __enter__(self):
        for i, m in enumerate(self.norms):
            m.forward = (lambda i, m: lambda x: self._forward(i, m, x))(i, m)  # shadows the class's forward
        for i, conv in self.after_conv.items():
            self.hooks.append(conv.register_forward_hook((lambda i: lambda m, a, y: self.fresh.update({i: y}))(i)))
        return self

    def __exit__(self, *exc):
        for m in self.norms:
            m.__dict__.pop("forward", None)  # (a norm module used twice is in `norms` twice)
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.fresh = [], {}

    def _forward(self, i: int, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        fresh = self.fresh.pop(i, None) is x  # (popped whatever happens: the output must not be held longer)
        if i == self.measuring:
            h, w = x.shape[-2:]
            t, b, l, r = self.core
            v = x[..., round(t * h):round(b * h), round(l * w):round(r * w)]
            self._add_up(v)
            self.kept = v if self.keep else None  # a view: nothing runs after this norm, and _pass copies it
            raise Stop
        if self.stats[i] is None:
            raise RuntimeError("tiling: a norm ran before its statistics were measured")
        if fresh and x.device.type == "cpu":
            # Its input is the output the convolution just before it in a chain gave this tile, which only the
            # chain held (see _after_conv; never a window of a map the tiler keeps): normalised in place, a few
            # rows at a time, so the tile takes no second block of that size. The encoder's and decoder's
            # full-resolution tiles (ResNet-9 at 1536 x 2048 in bf16: 12 MiB each then) take two blocks, not
            # three; its peaks were 830-844 MiB over 4 processes, against 835-859. The same work: 0.78 ms for
            # such a tile's norm by rows in place, 0.73 into a new block.
            _in_place(x, lambda part: self._apply(m, part, *self.stats[i]))
            return x
        return self._apply(m, x, *self.stats[i])

    @property
    def measured(self) -> nn.Module | None:
        """The norm module being measured, if any."""
        return None if self.measuring is None else self.norms[self.measuring]

    def measure(self, i: int, keep: bool = False) -> None:
        self.measuring, self.sums, self.keep = i, [0.0, 0.0, 0], keep

    def _add_up(self, v: torch.Tensor) -> None:
        """Merge the per-channel statistics of 1 x C x h x w `v` (a tile's core, any dtype and layout) into the
        running ones. On a CPU a few rows at a time: each chunk is copied into a reused fp32 matrix (positions x
        channels, so the reduction runs along rows whatever the layout) that stays in the caches; about 7x faster
        than one var_mean over the strided core of a channels-last bf16 tile, and no tile-sized fp32 copy is
        made. The chunks' statistics are combined once per tile: per-chunk merging of 512 KiB chunks ran
        13,000 chunks of some twenty tiny operations each for a 1536 x 2048 picture, a second of its 12."""
        if v.numel() == 0:  # an empty core
            return
        c, h, w = v.shape[-3:]
        with torch.autocast(v.device.type, enabled=False):
            if v.device.type != "cpu":  # one reduction: chunks would be many tiny kernel launches on a GPU
                var, mean = torch.var_mean(v.float(), dim=(0, 2, 3), correction=0)
                n = v[0, 0].numel()
                self._merge(mean.double(), var.double() * n, n)
                return
            rows = max(1, min(h, (1 << 19) // max(1, w * c)))  # 2 MiB of fp32, or one row
            if self.scratch.numel() < rows * w * c:  # kept for the next tiles: no page faults per chunk
                self.scratch = torch.empty(rows * w * c, dtype=torch.float32)
            chunk = self.scratch[:rows * w * c].view(rows * w, c)
            means, m2s, counts = [], [], []
            for r in range(0, h, rows):
                part = v[0, :, r:r + rows, :].permute(1, 2, 0)  # rows x w x C
                n = part.shape[0] * w
                x = chunk[:n]
                x.view(part.shape).copy_(part)
                # The mean, then squared deviations from it: no cancellation; 5x var_mean's speed. (Batch norm's
                # statistics kernel on the chunk was 10-20% faster, but it sums in plain fp32: the variance of a
                # 600 x 203 map came out 1.7e-5 off, against 1e-7 this way.)
                mean = x.mean(0)
                means.append(mean)
                m2s.append(x.sub_(mean).square_().sum(0))  # (in the chunk itself: the copy is ours)
                counts.append(n)
        # The chunks' statistics combined exactly (the parallel form of the update in _merge), in fp64.
        n = torch.tensor(counts, dtype=torch.float64)[:, None]
        means, total = torch.stack(means).double(), n.sum()
        mean = (n * means).sum(0) / total
        self._merge(mean, torch.stack(m2s).double().sum(0) + (n * (means - mean).square()).sum(0), int(total))

    def _merge(self, mean: torch.Tensor, m2: torch.Tensor, n: int) -> None:
        """Fold one tile's count, mean and sum of squared deviations into the running ones: the pairwise
        update of Chan, Golub & LeVeque 1979, mean = mean_a + d n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n
        with d = mean_b - mean_a; no large sum of squares cancels, and no tile-sized fp64 copy is made."""
        mean_a, m2_a, n_a = self.sums
        total = n_a + n
        d = mean - mean_a
        self.sums = [mean_a + d * (n / total), m2_a + m2 + d.square() * (n_a * n / total), total]

    def finish(self) -> None:
        mean, m2, n = self.sums
        self.stats[self.measuring] = (mean.float(), (m2 / n).float())
        self.measuring = None

    def record(self, layers: nn.Sequential, x: torch.Tensor) -> None:
        """Whole-picture statistics of `x` (a downscaled copy) for every norm, in one forward."""
        def forward(i, m, h):
            self.measure(i)
            self._add_up(h)  # no fp32 copy of a bf16 map
            self.finish()
            return self._apply(m, h, *self.stats[i])
        for i, m in enumerate(self.norms):
            m.forward = (lambda i, m: lambda h: forward(i, m, h))(i, m)
        try:
            layers(x)  # up to the last norm: only the statistics are wanted
        finally:
            for m in self.norms:
                del m.forward

    @staticmethod
    def _apply(m: nn.Module, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        # Batch norm with fixed statistics is exactly (x - mean) / sqrt(var + eps) [* weight + bias] per
        # channel: one pass in fp32 arithmetic, its output in the input's dtype and layout (as styleshift's
        # InstanceNorm2d gives it without gradients; its docstring says why), with no fp32 copy of a bf16 tile.
        with torch.autocast(x.device.type, enabled=False):
            weight, bias = (m.weight.float(), m.bias.float()) if m.affine else (None, None)
            return F.batch_norm(x, mean, var, weight, bias, training=False, eps=m.eps)


def downscale_to_fit(x: torch.Tensor, plan: Plan, budget: int) -> torch.Tensor:
    """`x` as is when its forward fits the budget, else area-averaged down until it does, sides a multiple of
    the stride. Area averaging keeps each channel's mean exactly and its variance approximately."""
    h, w = x.shape[-2:]
    # No smaller than 64 px a side: the deepest reflection pads need a few pixels, the statistics many more.
    factor = max(math.sqrt(budget / (plan.bytes_per_pixel * h * w)), min(1.0, 64 / min(h, w)))
    if factor >= 1:
        return x
    s = plan.stride
    size = (max(s, round(h * factor / s) * s), max(s, round(w * factor / s) * s))
    return F.interpolate(x, size=size, mode="area")


def spans(length: int, tile: int, align: int) -> list[tuple[int, int]]:
    """[start, end) pieces covering `length`, as equal as `align` allows, each at most about `tile`."""
    n = math.ceil(length / tile)
    step = max(align, math.ceil(length / n / align) * align)
    return [(a, min(a + step, length)) for a in range(0, length, step)]


class Tiler:
    """Runs `plan.layers` over a 1 x C x H x W picture (sides multiples of the stride) tile by tile, with
    whole-picture statistics in every instance norm (see the module docstring).

    `prepare` and `finish`, pixelwise functions, map windows of the picture to the network's input and pieces
    of its output to the result: the picture may then stay in a smaller type (8-bit pixels) and the result
    take one, with no whole-picture copy on either side in exact passes (36 MiB at 1536 x 2048 in bf16). With
    estimated statistics the picture is converted whole, strip by strip, for its downscaled copy."""

    def __init__(self, plan: Plan, tile: int | None, budget: int, prepare: Pixelwise | None = None,
                 finish: Pixelwise | None = None) -> None:
        self.plan, self.tile, self.budget = plan, tile, budget
        self.prepare, self.finish = prepare or _unchanged, finish or _unchanged

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        self.norms = norms = NormStats(plan.norms, _after_conv(plan.layers, plan.norms))
        # Tiles and buffers in the network's layout: its convolutions would reorder every tile otherwise.
        weight = next((p for p in plan.layers.parameters() if p.dim() == 4), None)
        self.layout = torch.channels_last if weight is not None and not weight.is_contiguous() and \
            weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        h, w = x.shape[-2:]
        checkpoint = plan.checkpoint_bytes_per_pixel * h * w
        exact = checkpoint <= 0.75 * self.budget
        if not exact and plan.norms:
            # The picture in the network's type a strip at a time (no fp32 copy of a 4096 x 4096 one), downscaled,
            # and let go before the statistics are taken on the copy (4096 x 4096: 963 MiB peak, 1050 with it held).
            small = downscale_to_fit(pixelwise(x, self.prepare, self.layout), plan, self.budget)
            norms.record(plan.layers[:plan.norm_layer[-1] + 1], small)
            del small
        # On a CPU the exact passes' tiles reuse what the tile before them freed (styleshift.heap), and what a
        # pass freed goes back before the next pass (trim): each pass's tiles then settle into memory of their
        # own sizes, not into holes that earlier passes' tiles of other sizes left. ResNet-9 at 1536 x 2048 in
        # bf16 peaked at 807-817 MiB (10 processes) with that and the small row chunks of _rows, against
        # 820-828 handing back only where the tiles changed shape (the trunk's passes then kept each other's
        # memory); each alone gave 821-825 and 812-822 (3 processes each); the same time (medians of 5,
        # alternating in one process: 7.77 against 7.96 s). Earlier measures, with larger tiles: 11.4 s
        # returning every feature map at once instead, and 7.6 s but up to 1.56 GiB keeping all until the end.
        # (Not for the single pass of estimated statistics: 4096 x 4096 then peaked at 1.5 GiB.)
        keep = keep_freed_memory() if exact and x.device.type == "cpu" else contextlib.nullcontext()
        self._grid = None  # the last pass's source shape and tile cores
        self._spare = None  # a freed block's buffer, for the next block's (see _pass)
        with norms, keep:
            first, source, scale = 0, x, 1  # the checkpoint: output of layers[:first], at `scale`
            measured = -1  # norms up to this one are measured already
            for i, layer in enumerate(plan.norm_layer if exact else ()):
                if i <= measured:
                    continue
                held = source.numel() * source.element_size() + plan.out_bytes_per_pixel[layer - 1] * h * w
                if (plan.layers[layer] is plan.norms[i] and layer > first and plan.scale[layer - 1] >= 1
                        and held <= 0.75 * self.budget):
                    # A norm that is a layer of its own: its input, kept while it is measured, is the
                    # checkpoint just before it. Where memory allows, the encoder and decoder then run once.
                    norms.measure(i, keep=True)
                    source = self._pass(source, first, scale, layer, capture=layer, at_norm=True, consume=True)
                    norms.finish()
                    first, scale = layer, int(plan.scale[layer - 1])
                    continue
                last_in_layer = i + 1 == len(plan.norms) or plan.norm_layer[i + 1] != layer
                tail = plan.tails[layer] if plan.tails else None
                split = tail is not None and not last_in_layer and 2 * checkpoint <= 0.75 * self.budget
                if (split and 0 < first < layer and scale == plan.stride
                        and _elementwise(plan.layers[first:layer], plan.norms)):
                    # The block's input x is a few pointwise layers away (the encoder's last norm and ReLU):
                    # apply them to the checkpoint in place, so the block splits as below. Measuring its first
                    # norm while moving the checkpoint would run its first convolution twice (0.25 s of ResNet-9
                    # at 1536 x 2048 in bf16, against 0.03 s for this).
                    _in_place(source, plan.layers[first:layer])
                    first = layer
                if (0 < first == layer and split and scale == plan.stride):
                    # A residual block x + tail(y): keep its first norm's input y while measuring that norm,
                    # then run the tail on y (its halo is one convolution's), measuring the last norm and
                    # writing its input z over y, and add x += norm(z). Each convolution runs once, for the
                    # same second buffer as below; 1.2x faster than that for ResNet-9 at 1536 x 2048 (bf16).
                    norms.measure(i, keep=True)
                    y = self._pass(source, first, scale, layer, capture=layer, at_norm=True)
                    norms.finish()
                    norms.measure(i + 1, keep=True)
                    z = self._pass(y, first, scale, layer, capture=layer, at_norm=True, tail=tail)
                    norms.finish()
                    self._add_normalised(source, z, plan.norms[i + 1], norms.stats[i + 1])
                    self._spare, y, z = y, None, None  # z was written over y
                    first, measured = first + 1, i + 1
                    continue
                if (0 < first == layer and last_in_layer and plan.residual[layer] and scale == plan.stride
                        and 2 * checkpoint <= 0.75 * self.budget):  # first > 0: x is ours to update
                    # A residual block's last norm: keep its input z while measuring it, then the block's
                    # output is x + norm(z), a pointwise update of the checkpoint. Each block's convolutions
                    # then run 1.5 times instead of 2, for a second checkpoint-sized buffer.
                    norms.measure(i, keep=True)
                    z = self._pass(source, first, scale, layer, capture=layer, at_norm=True)
                    norms.finish()
                    self._add_normalised(source, z, plan.norms[i], norms.stats[i])
                    z = None  # its memory may go to the next pass's result (see _buffer)
                    first += 1
                    continue
                # Move the checkpoint past the last lowest-resolution layer before this norm's layer.
                to = max((k for k in range(first, layer) if plan.scale[k] == plan.stride), default=None)
                norms.measure(i)
                moved = self._pass(source, first, scale, layer, capture=to, consume=True)
                norms.finish()
                if to is not None:
                    first, source, scale = to + 1, moved, plan.stride
            y = self._pass(source, first, scale, len(plan.layers) - 1, capture=len(plan.layers) - 1)
            # Freed while freed memory is still kept, so the trim on leaving hands it back: freed after, the
            # checkpoint could sit in the heap below the result, where glibc's trimming of the top cannot reach.
            source = moved = self._spare = None
        return y

    @staticmethod
    def _add_normalised(x: torch.Tensor, z: torch.Tensor, norm: nn.Module, stats) -> None:
        """x += norm(z) with fixed statistics, a few rows at a time so no third full-size buffer is made."""
        rows = _rows(x)
        for r in range(0, x.shape[-2], rows):
            x[..., r:r + rows, :] += NormStats._apply(norm, z[..., r:r + rows, :], *stats).to(x.dtype)

    def _pass(self, source: torch.Tensor, first: int, scale: int, last: int, capture: int | None,
              at_norm: bool = False, tail: tuple[nn.Sequential, float] | None = None, consume: bool = False):
        """Run layers first..last on tiles of `source` (at `scale`); return the output of layer `capture`
        over the whole picture (written into `source` itself when the shapes agree), or None. With `at_norm`,
        what is returned is instead the input of the norm being measured (inside layer `capture`). With
        `tail` (see Plan.tails), `source` is layer `first`'s first norm input and the tail runs instead,
        its result written over `source`. With `consume`, the caller needs `source` no longer once its
        result is there, so the result may go over its memory (see _overlay)."""
        plan = self.plan
        align = plan.stride // scale  # tile corners on multiples of the stride, in source pixels
        end = max(last, capture or 0)
        if tail is not None:
            (modules, reach), captured = tail, len(tail[0]) - 1
        else:
            modules, reach = plan.layers[first:last + 1], plan.halo_between(first, end)
            captured = None if capture is None else capture - first
            i = self.norms.measuring
            if i is not None and plan.norm_reach and plan.norm_layer[i] == end:
                # The pass stops at norm i: layer `end` reaches only as far as its leaves before that norm. A
                # residual block's first pass then has the halo of one convolution (1 px for ResNet-9's trunk),
                # not of the block's two.
                reach = sum(plan.reach[first:end]) + plan.norm_reach[i]
        halo = math.ceil(reach / scale / align) * align
        h, w = source.shape[-2:]
        # Tiles may take what the buffers leave of the budget; low-resolution layers take far larger tiles.
        held = source.numel() * source.element_size()
        if capture is not None:
            held += plan.out_bytes_per_pixel[capture] * h * w * scale**2
        working = max(self.budget - held, self.budget // 4)
        per_pixel = max(plan.layer_bytes_per_pixel[first:end + 1])
        for_tile = working
        if source.device.type == "cpu":
            # Tiles of as many pixels as CPU_TILE_MEMORY holds in fp32 (half of it in bf16), or 32 halos wide if
            # that is more (a halo then adds at most 14% to a tile's work): the exact passes' halos are a few
            # pixels. ResNet-9 at 1536 x 2048 in bf16 ran as fast in 64 MiB tiles as in the 184 MiB the buffers
            # leave (8.99 vs 9.29 s, median of 4 alternating) and peaked about 130 MB lower; in 32 MiB tiles as
            # fast again (8.5-9.5 s against 8.7-9.4) at 855-905 MiB against 924-950 for 48 and 960-1006 for 64
            # (3-6 processes each; 949 the largest of a benchmark's 3 later), the decoder's last pass most of
            # that; 24 MiB was slower (9.8-10.6 s). In fp32, 32 MiB tiles took 37-40 s, against 34-36 s in 64,
            # for no less memory. Passes over a map above the lowest resolution (the picture, the encoder's and
            # the decoder's half-scale maps) take half as much: their full-resolution tiles set the peak once
            # the residual blocks' passes settled lower (see __call__), and they are a small part of the time.
            # ResNet-9 at 1536 x 2048 in bf16: 802-807 MiB against 809-819 (4 processes each), in about the
            # same time (9.2 against 9.1 s). Halving the decoder's first pass too (from the quarter-scale map
            # to a half-scale one, written over it) raised its peak to 813-818.
            tile_bytes = CPU_TILE_MEMORY * plan.dtype.itemsize / 4  # per_pixel is in the plan's dtype too
            if scale < plan.stride:
                tile_bytes /= 2
            for_tile = min(working, max(tile_bytes, per_pixel * (32 * halo * scale) ** 2))
        tile = self.tile or fitting_tile(plan, per_pixel, halo * scale, for_tile)
        out, out_scale = None, plan.scale[capture] / scale if capture is not None else 1.0
        row_bytes = plan.out_bytes_per_pixel[capture] * w * scale if capture is not None else 0.0
        # Written over the source when it has the same shape; never over the caller's input (first == 0).
        finished = capture == len(plan.layers) - 1 and not at_norm and self.finish is not _unchanged
        in_place = tail is not None or (first > 0 and capture is not None and not at_norm and out_scale == 1
                                        and source.dtype == plan.dtype and plan.channels(capture) == source.shape[1]
                                        and not finished)  # a finished result may take another type
        # A result kept for later passes may go into the memory of a source of the tiler's own (see _buffer),
        # and over that source when the caller is done with it, even with another size (see _overlay).
        own = (capture is not None and capture < len(plan.layers) - 1 and first > 0 and source.dtype == plan.dtype
               and source.shape[0] == 1 and source.is_contiguous(memory_format=self.layout))
        over = own and consume and not in_place and self.layout == torch.channels_last  # rows apart: see _overlay
        tall = wide = tile
        if over and not self.tile:
            # A strip of results waits for its last tile before it goes over the source: keep its height to an
            # eighth of the working memory (ResNet-9 at 1536 x 2048 in bf16: 24 MiB strips at a quarter, and
            # the encoder's and decoder's passes over their sources peaked 15-20 MiB lower at an eighth).
            # Strips under 48 feature rows get tiles widened to the same area with their halos (their forward's
            # memory), so the convolutions still get large inputs: square tiles of the strip's height ran the
            # fp32 ResNet-9 trunk at 1536 x 2048 in 12 x 12 px pieces (65 s; 46 s widened) when in-place passes
            # held such strips too.
            tall = min(tile, max(plan.stride, int(working / 8 / row_bytes) // plan.stride * plan.stride))
            if tall < 48 * scale:
                rim = 2 * halo * scale
                wide = max(tile, int((tile + rim) ** 2 / (tall + rim) - rim) // plan.stride * plan.stride)
        def cut(tall: int, wide: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
            return spans(h, max(tall // scale, align), align), spans(w, max(wide // scale, align), align)

        rows, columns = cut(tall, wide)
        order = None  # with `over`: "down" or "up", the order of strips that lets results go over the source
        if over:
            shape = (1, plan.channels(capture), round(h / out_scale), round(w / out_scale))
            order = _overlay(source, shape, rows, halo)
            if order is None:  # no strip waits to go over the source after all: whole tiles, as without `over`
                rows, columns = cut(tile, tile)
        if self.norms.measuring is None:  # nothing to add up (the last pass): _add_up's scratch goes before the trim
            self.norms.scratch = torch.empty(0)
        grid = (source.shape, rows, columns)
        if grid != self._grid:  # a spare map, if any, is for passes over blocks alike: dropped when they end,
            self._spare = None  # so that the trim hands it back
        self._grid = grid
        trim()  # what the last pass freed (see __call__)
        # In place, each tile's result goes over the source at once; what later tiles read of the rows and
        # columns it replaces is copied aside first: the rows above the strip (`saved`), its bottom rows for the
        # next strip (`below`) and the columns left of the next tile (`left`). No strip of results is held
        # (it was 48 MiB for each residual block of ResNet-9 at 1536 x 2048 in bf16).
        saved = None
        # Windows of one size where tiles are read in any order (not in place, not over the source): see _windows.
        even = not in_place and order is None
        row_windows, column_windows = _windows(rows, halo, h, even), _windows(columns, halo, w, even)
        pointwise = self._pointwise_prefix(modules, captured)  # in place on windows of the tiler's own (_run)
        pads = self._inner_pads(modules, None if tail is not None else first)
        for (y0, y1), (a0, a1) in zip(*(reversed(v) if order == "up" else v for v in (rows, row_windows))):
            strip = left = None
            if in_place:
                keep = min(halo, y1 - a0)  # rows of this strip and those above it that the next strip reads
                below = torch.empty_like(source[..., y1 - min(keep, y1 - y0):y1, :], memory_format=self.layout)
            for (x0, x1), (b0, b1) in zip(columns, column_windows):
                fh, fw = a1 - a0, b1 - b0
                # the core in window pixels, the window's size, and which sides lie on the picture's border
                self._window = (y0 - a0, y1 - a0, fh, x0 - b0, x1 - b0, fw, (a0 == 0, a1 == h, b0 == 0, b1 == w))
                if not in_place:
                    window = source[..., a0:a1, b0:b1]
                    if first == 0 and tail is None:
                        window = self.prepare(window)
                else:
                    # A copy of its own, made in one block: see _run
                    top = 0 if saved is None else saved.shape[-2]
                    window = torch.empty((*source.shape[:2], top + a1 - y0, b1 - b0), dtype=source.dtype,
                                         device=source.device, memory_format=self.layout)
                    if saved is not None:
                        window[..., :top, :] = saved[..., b0:b1]
                    window[..., top:, :] = source[..., y0:a1, b0:b1]
                    if left is not None and x0 > b0:
                        window[..., top:top + y1 - y0, :x0 - b0] = left[..., b0 - x0:]
                window = [window]  # _run empties it: a window made of copies is freed once its layers are done with it
                core = None  # the last tile's result, copied where it belongs: not held while this tile runs
                core = self._run(window, modules, captured, at_norm, pointwise, pads, own=in_place)
                if capture is None:
                    continue
                if in_place:
                    replaced = source[..., y0:y1, x0:x1]
                    below[..., x0:x1] = replaced[..., replaced.shape[-2] - below.shape[-2]:, :]
                    if halo:
                        left = (replaced if left is None or replaced.shape[-1] >= halo
                                else torch.cat([left, replaced], dim=-1))[..., -halo:].clone()
                    replaced.copy_(core)
                    continue
                if finished:
                    core = self.finish(core)
                c0, c1, d0, d1 = (round(v / out_scale) for v in (y0, y1, x0, x1))
                if out is None:
                    size = (source.shape[0], core.shape[1], round(h / out_scale), round(w / out_scale))
                    if order is not None and (size != shape or core.dtype != source.dtype):
                        order = None  # the plan foresaw another result: it gets memory of its own
                    if order is not None:
                        self._spare = None  # the result may go past the source's end, where a spare map lies
                        out = _map(source, shape, self.layout)
                    else:
                        out = self._buffer(size, core, source if own else None)
                if order is not None:  # the result's rows go over the source once every tile of the strip has read it
                    if strip is None:
                        strip = torch.empty((1, core.shape[1], c1 - c0, out.shape[-1]), dtype=core.dtype,
                                            device=core.device, memory_format=self.layout)
                    strip[..., d0:d1] = core
                    continue
                out[..., c0:c1, d0:d1] = core
            if order is not None and strip is not None:
                out[..., round(y0 / out_scale):round(y1 / out_scale), :] = strip
                continue
            if in_place:  # a strip lower than the halo: the rows above it come from the last copy
                saved = below if keep <= y1 - y0 else torch.cat([saved, below], dim=-2)[..., -keep:, :].clone()
        return source if in_place else out

    def _buffer(self, shape: tuple[int, ...], like: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """An uninitialised map for a pass's result: the spare one a residual block left, when it fits. Each
        block's first-norm input then reuses the last one's memory rather than a new block, which the first
        tile's allocations had often taken part of the freed one's place (1536 x 2048 in bf16: a 96 MiB block
        each, and up to 100 MB more heap). Else, given the pass's `source` (a map of the tiler's own), the
        memory past its end where that holds enough: a map a pass wrote over a larger one leaves it there
        (see _overlay), and the first residual block's map goes there."""
        spare, self._spare = self._spare, None
        if (spare is not None and spare.shape == shape and spare.dtype == like.dtype and spare.device == like.device
                and spare.is_contiguous(memory_format=self.layout)):
            return spare
        if source is not None and source.dtype == like.dtype:
            end = source.storage_offset() + source.numel()
            if (source.untyped_storage().nbytes() // source.element_size() - end >= math.prod(shape)
                    and source.is_contiguous(memory_format=self.layout)):
                return _map(source, shape, self.layout, end)
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=self.layout)

    def _pointwise_prefix(self, modules: nn.Sequential, capture: int | None) -> int:
        """How many of the first `modules` compute each pixel from itself alone (see _elementwise), before
        `capture` and short of the norm being measured: a tile of the tiler's own may go through them in place."""
        measured = self.norms.measured
        n = 0
        while (n < len(modules) and n != capture and _elementwise(modules[n:n + 1], self.norms.norms)
               and not any(m is measured for m in modules[n].modules())):
            n += 1
        return n

    def _inner_pads(self, modules: nn.Sequential, first: int | None) -> list[nn.Module]:
        """The pads a tile of this pass may leave out where its window lies inside the picture: each pads for
        the convolution right after it, whose output at those sides falls in the halo and is discarded anyway.
        Leaving them out spares a copy of the tile (ResNet-9's residual blocks: one of the three blocks of the
        heap a tile of their second pass takes), the pad's time, and the convolution's work on the garbage
        rim. ResNet-9 at 1536 x 2048 in bf16: its 18 residual-block passes took 5.36 s instead of 5.50 (medians
        of 4, alternating in one process), and peaked at 827-839 MiB instead of 849-867 (3 processes each).
        Only for passes at one scale made of such pad-and-convolution pairs (the convolution right after its
        pad: stride 1, no padding of its own, the pad's width its radius), pointwise layers and the norms, so
        every map is the window less the pads left out at its inner sides (see _pad), and a pad left out hands
        its input to a convolution, never to a layer that might work on it in place. Containers must be plain
        chains (nn.Sequential), which combine nothing: another might add maps of two sizes (a residual block's
        x + f(x)). The one exception is a top-level layer whose split into y = head(x) and x + tail(y) was
        checked on the probe (Plan.tails; its head is a plain chain), in a pass that stops at the tail's first
        norm, so that only the head runs (`first`: the index of `modules[0]` in the plan, None for a tail).
        [] for any other pass."""
        measured = self.norms.measured
        tails = self.plan.tails if first is not None and self.plan.tails else ()
        pads, pad = {}, None  # (a dict: a pad used twice is patched once, each call updating the geometry)
        for j, layer in enumerate(modules):
            split = bool(tails) and tails[first + j] is not None and tails[first + j][0][0] is measured
            for m in layer.modules():
                if next(m.children(), None) is not None:
                    if type(m) is nn.Sequential or (m is layer and split):
                        continue
                    return []
                if m is measured:  # the pass stops here
                    return list(pads) if pad is None else []
                if isinstance(m, PADS):
                    if pad is not None:
                        return []
                    pad = m
                elif isinstance(m, nn.Conv2d):
                    kh, kw = m.kernel_size
                    if (pad is None or m.stride != (1, 1) or m.dilation != (1, 1) or m.padding != (0, 0) or kh % 2 == 0
                            or kw % 2 == 0 or tuple(pad.padding) != (kw // 2, kw // 2, kh // 2, kh // 2)):
                        return []
                    pads[pad] = None
                    pad = None
                elif pad is not None or not _elementwise_leaf(m, self.norms.norms):
                    return []
        return list(pads) if pad is None else []

    def _pad(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`module`'s padding of a tile, on the sides where its window meets the picture's border only; the
        core's place in the smaller result is updated for the norm being measured and for the capture."""
        border = self._window[-1]
        widths = module.padding  # left, right, top, bottom
        sides = (2, 3, 0, 1)  # which entry of `border` each width is for
        kept = tuple(p if border[side] else 0 for p, side in zip(widths, sides))
        for p, k, side in zip(widths, kept, sides):
            self._skipped[side] += p - k
        self._place_core()
        if not any(kept):
            return x
        if isinstance(module, nn.ReflectionPad2d):
            return F.pad(x, kept, mode="reflect")
        if isinstance(module, nn.ReplicationPad2d):
            return F.pad(x, kept, mode="replicate")
        return F.pad(x, kept, value=module.value)  # zero or constant

    def _place_core(self) -> None:
        """The tile's core as fractions of the maps its layers make now (NormStats.core), from its window
        (see _pass) less the rows and columns the pads left out so far (see _pad)."""
        y0, y1, fh, x0, x1, fw, _ = self._window
        top, bottom, left, right = self._skipped
        fh, fw = fh - top - bottom, fw - left - right
        self.norms.core = ((y0 - top) / fh, (y1 - top) / fh, (x0 - left) / fw, (x1 - left) / fw)

    def _run(self, tile: list[torch.Tensor], modules: nn.Sequential, capture: int | None,
             at_norm: bool = False, pointwise: int = 0, pads: list[nn.Module] = (), own: bool = False
             ) -> torch.Tensor | None:
        """One tile (the one item of `tile`, taken out of it so that nothing else holds it while the layers
        run) through `modules`: the core of module `capture`'s output (if any), or with `at_norm` of the
        measured norm's input; a view, for the caller to copy where it belongs. The first `pointwise` modules
        (see _pointwise_prefix) run on it in place, a few rows at a time, where the tile is a copy of the
        tiler's own (`own`, or copied here): a residual block's tail then starts (norm, ReLU) with no second
        tile-sized block, and each of its tiles took three blocks of the heap, not four (ResNet-9 at 1536 x 2048
        in bf16: the residual blocks held 822-860 MiB, median 826, against 833-896, median 851, over 5 processes
        each; the same time). With the pads inside the picture left out too (`pads`, see _inner_pads) it takes
        two: its window and the convolution's output."""
        t = tile.pop()
        kept = None
        self._skipped = [0, 0, 0, 0]  # rows and columns the pads left out (see _inner_pads): top, bottom, left, right
        self._place_core()  # and again as they run
        if not isinstance(_first_leaf(modules), PADS_AND_CONVS):
            view, t = t, t.contiguous(memory_format=self.layout)  # a padding or convolution copies its input anyway
            # A copy made here is the tile's own too. The encoder's last downsampling pass (norm, ReLU and a
            # strided convolution on windows of a kept map) then holds a window and the convolution's smaller
            # output, not two window-sized blocks.
            own = own or t is not view
            del view
        if not own:
            pointwise = 0
        if pointwise:
            _in_place(t, modules[:pointwise])
        for pad in pads:
            pad.forward = (lambda pad: lambda x: self._pad(pad, x))(pad)  # shadows the class's forward
        try:
            for k, module in enumerate(modules):
                if k < pointwise:
                    continue
                if capture is not None and k == capture + 1:
                    kept = kept.clone()  # the layers after `capture` may work in place
                t = module(t)
                if k == capture:
                    h, w = t.shape[-2:]
                    top, bottom, left, right = self.norms.core
                    kept = t[..., round(top * h):round(bottom * h), round(left * w):round(right * w)]
        except Stop:
            if at_norm:
                kept, self.norms.kept = self.norms.kept, None  # the view holds the whole tile: not a pass longer
        finally:
            for pad in pads:
                pad.__dict__.pop("forward", None)
        return kept


def _windows(spans: list[tuple[int, int]], halo: int, length: int, even: bool) -> list[tuple[int, int]]:
    """The window each span of a side is read through: the span and `halo` pixels each side, within 0..length.
    With `even`, every window as long as the longest, those at the ends reaching further in (the extra pixels
    are discarded with the halo): every tile's layers then ask for blocks of the same sizes, which glibc hands
    back out whole. With the few pixels' difference of border tiles, a larger block did not fit where a smaller
    one was freed, and the heap grew by it: ResNet-9 at 1536 x 2048 in bf16 grew by 60 MB in the decoder's last
    pass, to a 903 MiB peak (840 with even windows). Window ends stay on multiples of the stride, as the spans'."""
    windows = [(max(a - halo, 0), min(b + halo, length)) for a, b in spans]
    if not even:
        return windows
    size = max(b - a for a, b in windows)
    return [(min(a + size, length) - size, min(a + size, length)) for a, b in windows]


def _overlay(source: torch.Tensor, shape: tuple[int, ...], rows: list[tuple[int, int]], halo: int) -> str | None:
    """The order of strips ("down" or "up") in which a pass may write its result, of `shape`, over the memory
    of its `source` from the start of that memory on, a strip at a time once the strip's tiles have run
    without touching rows of the source a later strip still reads; None if neither order allows it.

    The encoder's last downsampling then writes its quarter-scale map over the half-scale map it reads, top
    down, and the decoder's first upsampling writes its half-scale map over the quarter-scale one, bottom up,
    into the memory the residual blocks' second map held: ResNet-9 at 1536 x 2048 in bf16 needs 192 MiB of
    maps there, not 288. Channels-last maps only: there each row of the picture is one run of memory, where
    in NCHW every channel holds a piece of it. What lies before the source in its memory (when it was placed
    after another map, see Tiler._buffer) is that earlier map, which the source has replaced."""
    storage = source.untyped_storage().nbytes() // source.element_size()
    if math.prod(shape) > storage:
        return None
    h = source.shape[-2]
    base, source_row = source.storage_offset(), source.shape[1] * source.shape[-1]
    out_row, ratio = shape[1] * shape[-1], shape[-2] / h

    def written(y0: int, y1: int) -> tuple[int, int]:  # elements of the result a strip writes
        return round(y0 * ratio) * out_row, round(y1 * ratio) * out_row

    def reads(y0: int, y1: int) -> tuple[int, int]:  # elements of the source a strip's tiles read
        return base + max(y0 - halo, 0) * source_row, base + min(y1 + halo, h) * source_row

    # Later strips read only rows beyond the next one's first (going down) or before its last (going up).
    if all(written(*rows[j])[1] <= reads(*rows[j + 1])[0] for j in range(len(rows) - 1)):
        return "down"
    if all(written(*rows[j])[0] >= reads(*rows[j - 1])[1] for j in range(1, len(rows))):
        return "up"
    return None


def _map(base: torch.Tensor, shape: tuple[int, ...], layout: torch.memory_format, offset: int = 0) -> torch.Tensor:
    """A map of `shape` in `layout` over `base`'s memory, from element `offset` of it on."""
    n, c, h, w = shape
    strides = (c * h * w, 1, w * c, c) if layout == torch.channels_last else (c * h * w, h * w, w, 1)
    return base.as_strided(shape, strides, offset)


def _after_conv(layers: nn.Sequential, norms: tuple[nn.Module, ...]) -> dict[int, nn.Module]:
    """The norms (their indices) that directly follow a convolution in a chain (an nn.Sequential) reached from
    the top-level layers through chains only, with that convolution: when it has just run, the norm's input is
    its fresh output, which nothing but the chain held. (A chain inside another module is not searched: that
    module might call its children itself and keep the convolution's output, as a skip connection does.)"""
    index = {id(m): i for i, m in enumerate(norms)}
    found, chains = {}, [layers]
    while chains:
        chain = list(chains.pop())
        chains += [m for m in chain if type(m) is nn.Sequential]
        found.update({index[id(b)]: a for a, b in zip(chain, chain[1:])
                      if id(b) in index and isinstance(a, (nn.Conv2d, nn.ConvTranspose2d))})
    return found


def _elementwise(layers: nn.Sequential, norms: tuple[nn.Module, ...]) -> bool:
    """Whether `layers` map each pixel to a function of itself alone, so they may run on a few rows at a time:
    a plain chain of activations and of the instance norms (fixed to their whole-picture statistics while
    tiling). Not pads, nor group or batch norms, whose statistics would come from the rows at hand."""
    return all(type(m) is nn.Sequential if next(m.children(), None) is not None  # a container that only chains
               else _elementwise_leaf(m, norms) for m in layers.modules())


def _elementwise_leaf(m: nn.Module, norms: tuple[nn.Module, ...]) -> bool:
    """Whether a module without children computes each pixel from itself alone (see _elementwise)."""
    return isinstance(m, ELEMENTWISE) or (isinstance(m, nn.Dropout) and not m.training) or \
        any(m is n for n in norms)


def _in_place(x: torch.Tensor, pointwise: Pixelwise) -> None:
    """x = pointwise(x), a few rows at a time (see _rows): no halo, no second full-size buffer."""
    rows = _rows(x)
    for r in range(0, x.shape[-2], rows):
        x[..., r:r + rows, :] = pointwise(x[..., r:r + rows, :])


def _rows(x: torch.Tensor, chunk: int = 512 << 10) -> int:
    """How many rows of a map hold about `chunk` bytes (at least one), for the passes that update a map a few
    rows at a time. On a CPU small, so their temporaries fit the holes tiles leave in the heap: 64 rows of the
    ResNet-9 trunk at 1536 x 2048 in bf16 were 16 MiB, twice a tile's blocks, and the heap grew by 16-31 MB
    right after them, between two blocks' passes. Chunks of 2 MiB still took three places of their own
    beside a tile's blocks in every residual block's second pass (see Tiler.__call__ for the peaks). On a
    GPU, whose allocator caches blocks, all rows at once: chunks would be many tiny kernel launches."""
    if x.device.type != "cpu":
        return max(1, x.shape[-2])
    return max(1, chunk // max(1, x.shape[0] * x.shape[1] * x.shape[-1] * x.element_size()))


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def pixelwise(x: torch.Tensor, f: Pixelwise | None, layout: torch.memory_format, rows: int = 256) -> torch.Tensor:
    """f(x) for a pixelwise f, a few rows at a time: f's intermediate copies are a strip's, not the batch's."""
    if f is None or f is _unchanged:
        return x
    out = None
    for r in range(0, x.shape[-2], rows):
        part = f(x[..., r:r + rows, :])
        if out is None:
            out = torch.empty((*part.shape[:2], *x.shape[-2:]), dtype=part.dtype, device=part.device,
                              memory_format=layout)
        out[..., r:r + rows, :] = part
    return out


def _first_leaf(module: nn.Module) -> nn.Module:
    """The first module without children, in registration order (a guess at what runs first; only speed
    depends on it)."""
    while True:
        children = list(module.children())
        if not children:
            return module
        module = children[0]


def tiled_forward(net: nn.Module, x: torch.Tensor, plan: Plan, tile: int | None, budget: int,
                  prepare: Pixelwise | None = None, finish: Pixelwise | None = None) -> torch.Tensor:
    """`finish(net(prepare(x)))` for an N x C x H x W input whose sides are multiples of the stride, computed in
    tiles with whole-picture statistics (each picture of the batch its own). Tiles are `tile` px a side, or with
    None as large as `budget` allows for the layers each pass runs. `prepare` and `finish` (pixelwise, by
    default none) run on each tile: see Tiler."""
    tiler = Tiler(plan, tile, budget, prepare, finish)
    if x.shape[0] == 1:
        return tiler(x)  # torch.cat would copy the one result: a whole picture's worth more memory
    return torch.cat([tiler(x[n:n + 1]) for n in range(x.shape[0])])
