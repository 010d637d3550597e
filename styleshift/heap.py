"""How glibc's malloc treats the large feature maps of a CPU forward (Linux only; process-wide settings).

PyTorch's CPU tensors come straight from malloc. Blocks above glibc's mmap threshold (at most 32 MiB) are
mmapped when allocated and unmapped when freed, so every new feature map of that size is fresh memory that
the kernel faults in and zeroes page by page. On the 2-core machines we measure on, that doubled the time
of every memory-bound layer: cloning a 256 x 256 x 256 bf16 map took 8.7 ms, against 1.3 ms into memory
already touched, and a ResNet-9 forward at 1024 x 1024 spent 0.8 s of its 2.8 s in page faults.

How styleshift uses them:
- Whole pictures: freed blocks stay with the process (keep_freed_memory) and are reused by the next layers
  (the forward above: 2.8 s -> 2.1 s; peak RSS 0.96-1.29 GB instead of 0.90 GB, varying with how the heap
  fragments, so the Stylizer keeps only where 2.25 times the forward's estimate fits a quarter of the free
  memory). Handed back after each picture rather than kept for the next: glibc's aligned blocks fragment (a
  freed block falls a little short of the next aligned request of its size, and small allocations settle in
  it), so five rounds of one 96 MiB tensor could leave five copies resident.
- Tiled pictures: memory is what matters, so large blocks are unmapped at once (return_freed_memory), except
  within the exact passes of styleshift.tiling, whose tiles keep and reuse what the tile before them freed;
  it is handed back (trim) before the next pass. (1536 x 2048 in bf16, with the larger tiles of the time and
  memory kept across passes whose tiles matched: 11.4 s -> 7.0-8.1 s against returning every feature map at
  once; the peaks now are in Tiler.__call__.)

What this does not do: the settings are the whole process's, so while a picture runs whole (or in an exact
tiling pass) the decoding and encoding threads of a batch (styleshift.apply) allocate under them too, and a
tiled picture in another thread would; threads other than the main one allocate from heaps of their own, which
still map blocks above 64 MiB, so the gain is the main thread's. Leaving restores glibc's documented defaults,
not values set from outside (MALLOC_* variables, GLIBC_TUNABLES), and glibc's dynamic mmap threshold stays off
from then on. An allocator preloaded in glibc's place (jemalloc, tcmalloc) ignores all of it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from collections.abc import Iterator

# mallopt parameters, from malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's defaults, restored on leaving (see above for what that cannot restore)
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024

_lock = threading.Lock()
_kept = 0  # nesting depth of keep_freed_memory, over all threads


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (musl and others lack them)
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Inside: large blocks come from the heap and freed ones are reused, not unmapped (no page faults
    after the first use of each page). On leaving the outermost one: glibc's defaults again, and the freed
    memory is handed back to the system (malloc_trim), so the process does not stay at its peak."""
    global _kept
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _kept == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        _kept += 1
    try:
        yield
    finally:
        with _lock:
            _kept -= 1
            if _kept == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def trim() -> None:
    """Inside keep_freed_memory: hand the freed pages back now (the next allocations fault them in again)."""
    if _kept:
        hand_back()


def hand_back() -> None:
    """Hand the heap's free pages back to the system now, wherever they lie. glibc by itself only shrinks
    the top of its heap, so blocks freed below live ones stay resident: after a one-off allocation (the
    fp32 copy of a network that styleshift.tiling probes), 62 MB of a 1536 x 2048 picture's peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def return_freed_memory() -> None:
    """Have glibc hand large freed blocks back to the system at once.

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which
    feature maps come from the heap, whose freed pages stay resident and fragment (one heap per thread):
    tiling a 1536 x 2048 picture peaked at 1623 MiB instead of 1278 MiB with a fixed 1 MiB threshold,
    for 10% more time (page faults). Called when a picture is tiled, i.e. when memory is what matters.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
