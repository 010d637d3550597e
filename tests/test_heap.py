"""styleshift.heap: freed feature maps stay with the process while a picture runs whole, and are handed back
afterwards (Linux with glibc only: elsewhere the context does nothing)."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTOS
from styleshift import heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None,
                                reason="glibc's malloc only")

BLOCK = 96 * 2**20  # above glibc's largest mmap threshold (32 MiB): by default it is unmapped when freed


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


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
    from styleshift.stylizer import Stylizer

    with Image.open(PHOTOS[0]) as im:
        photo = np.asarray(im.convert("RGB").resize((96, 64)))
    s = Stylizer(tiny_style, device="cpu", precision="fp32", tile_size=0)
    depth = []
    net = s.net.forward
    monkeypatch.setattr(s.net, "forward", lambda x: (depth.append(heap._kept), net(x))[1])
    out = s.stylize(photo)
    assert depth == [1] and heap._kept == 0
    monkeypatch.setattr(heap, "_glibc", lambda: None)  # as on a system without glibc
    assert np.array_equal(s.stylize(photo), out)
