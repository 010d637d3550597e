"""styleshift.heap: freed feature maps stay with the process while a picture runs whole, and are handed back
afterwards (Linux with glibc only: elsewhere the context does nothing)."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTOS
from styleshift import heap

# glibc's malloc with its default settings only: not another allocator preloaded, nor tuned from outside
TUNED = "LD_PRELOAD" in os.environ or any(k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ)
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None or TUNED,
                                reason="glibc's malloc with its defaults only")

BLOCK = 96 * 2**20  # above glibc's largest mmap threshold (32 MiB): by default it is unmapped when freed


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def touched_then_freed() -> int:
    """RSS growth that remains after a large tensor is written and freed."""
    before = rss()
    t = torch.empty(BLOCK // 4)
    t.fill_(1.0)
    del t
    return rss() - before


def test_freed_memory_is_kept_inside_and_handed_back_after():
    assert touched_then_freed() < BLOCK // 4  # default: handed back at once
    with heap.keep_freed_memory():
        with heap.keep_freed_memory():  # nested: only the outermost restores
            assert touched_then_freed() > BLOCK // 2  # kept for the next layer to reuse
        assert heap._kept == 1
        inside = rss()
    assert heap._kept == 0
    assert rss() < inside - BLOCK // 2  # trimmed on leaving
    assert touched_then_freed() < BLOCK // 4  # and glibc's behaviour is back


def test_whole_pictures_run_inside_and_give_the_same_pixels(tiny_style, monkeypatch):
    from styleshift import stylizer

    with Image.open(PHOTOS[0]) as im:
        photo = np.asarray(im.convert("RGB").resize((96, 64)))
    entered = []
    monkeypatch.setattr(stylizer, "keep_freed_memory", lambda: (entered.append(1), heap.keep_freed_memory())[1])
    s = stylizer.Stylizer(tiny_style, device="cpu", precision="fp32", tile_size=0)
    depth = []  # heap._kept while the network runs on the picture (not on the tiling plan's probe)
    net = s.net.forward
    monkeypatch.setattr(s.net, "forward", lambda x: (depth.append(heap._kept) if x.shape[-1] == 96 else None,
                                                     net(x))[1])
    out = s.stylize(photo)
    assert depth == [1] and heap._kept == 0 and entered == [1]

    # A picture whose kept peak might not fit a quarter of the free memory runs whole without it.
    monkeypatch.setattr(stylizer, "available_memory", lambda device: 4)
    assert np.array_equal(s.stylize(photo), out)
    assert depth == [1, 0] and entered == [1]

    monkeypatch.setattr(heap, "_glibc", lambda: None)  # as on a system without glibc
    monkeypatch.setattr(stylizer, "available_memory", lambda device: 1 << 40)
    assert np.array_equal(s.stylize(photo), out) and entered == [1, 1]


def test_exact_tiling_keeps_freed_memory_pass_by_pass(tiny_style, monkeypatch):
    """The tiler's exact passes keep what their tiles free, for the pass's later tiles, and hand it back
    before the next pass; the single pass with estimated statistics (a picture too large for the
    checkpoints) keeps nothing."""
    from styleshift import stylizer, tiling

    with Image.open(PHOTOS[1]) as im:
        photo = np.asarray(im.convert("RGB").resize((96, 64)))
    trims, shapes = [], []
    monkeypatch.setattr(tiling, "trim", lambda: trims.append(heap._kept))
    real_pass = tiling.Tiler._pass

    def spy_pass(self, source, *args, **kwargs):
        shapes.append(tuple(source.shape))
        return real_pass(self, source, *args, **kwargs)

    monkeypatch.setattr(tiling.Tiler, "_pass", spy_pass)
    exact = stylizer.Stylizer(tiny_style, device="cpu", precision="fp32", tile_size=32)
    exact.stylize(photo)
    # handed back before every pass, while freed memory is kept (inside it), and no longer kept after
    assert len(trims) == len(shapes) >= 2 and set(trims) == {1} and heap._kept == 0

    trims.clear()
    monkeypatch.setattr(stylizer, "working_memory", lambda device, free=None: 1)  # no room for a checkpoint
    exact.stylize(photo)
    assert trims == [0]
