"""Batch conversion: which output each input gets, and converting them without ever losing a file.

Rules (what `styleshift apply` does):
- a single file goes to `<stem>.<style><ext>` beside it, or to `-o PATH` (a file, or a folder to put it in);
- a folder is scanned recursively and mirrored under `-o` (default: `<folder>.<style>` beside it);
- the output keeps the input's format and extension unless a format is asked for;
- existing outputs are skipped unless `overwrite`; an output never replaces its input;
- every write is atomic, so a run killed at any moment leaves no partial output under a final name, and
  running it again converts only what is missing (temporary files the killed run left are removed);
- one bad file is reported and the rest are converted; a destination that cannot take any file (disk
  full, read-only or forbidden folder) stops the run at once with one line saying so;
- under torchrun each process converts its share of the files, and the summary covers them all.
"""

from __future__ import annotations

import functools
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .fsutil import DestinationError, remove_stale_temporaries
from .images import (EXTENSION_OF_FORMAT, FORMAT_OF_EXTENSION, OUTPUT_FORMAT_OF, ImageError, Picture, read_image,
                     scan_images, write_image)


@dataclass(frozen=True)
class Job:
    src: Path
    dst: Path
    format: str  # PIL format name


@dataclass
class Summary:
    converted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stopped: str | None = None  # why the run stopped before the end (the destination failed)

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None

    def line(self) -> str:
        line = f"converted {self.converted}, skipped {self.skipped} (already there), failed {len(self.failed)}"
        if self.stopped:
            line += f"; stopped: {self.stopped} (run it again to convert the rest)"
        return line

    def merge(self, other: "Summary") -> "Summary":
        return Summary(self.converted + other.converted, self.skipped + other.skipped, self.failed + other.failed,
                       self.stopped or other.stopped)


def normalise_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    ext = "." + fmt.lower().lstrip(".")
    if ext not in FORMAT_OF_EXTENSION:
        raise ValueError(f"unknown format {fmt!r}; choose from jpg, png, webp, bmp, tiff")
    return FORMAT_OF_EXTENSION[ext]


def _with_format(path: Path, fmt: str | None) -> tuple[Path, str]:
    """`path` with the extension of `fmt` (kept as it is when it already fits), and the format."""
    if fmt is None:
        source = FORMAT_OF_EXTENSION[path.suffix.lower()]
        fmt = OUTPUT_FORMAT_OF.get(source, source)
        return (path, fmt) if fmt == source else (path.with_suffix(EXTENSION_OF_FORMAT[fmt]), fmt)
    if FORMAT_OF_EXTENSION.get(path.suffix.lower()) == fmt:
        return path, fmt
    return path.with_suffix(EXTENSION_OF_FORMAT[fmt]), fmt


def plan(src: str | os.PathLike, output: str | os.PathLike | None, style_name: str,
         fmt: str | None = None) -> list[Job]:
    """The jobs for converting `src` (a file or a folder) to `output`."""
    src, fmt = Path(src), normalise_format(fmt)
    if src.is_dir():
        out_dir = Path(output) if output is not None else src.with_name(f"{src.name}.{style_name}")
        if out_dir.resolve() == src.resolve():
            raise ValueError(f"{out_dir}: the output folder is the input folder; outputs would replace inputs")
        jobs = []
        for path in scan_images(src, exclude=out_dir):
            dst, f = _with_format(out_dir / path.relative_to(src), fmt)
            jobs.append(Job(path, dst, f))
        return jobs
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.suffix.lower() not in FORMAT_OF_EXTENSION:
        raise ValueError(f"{src}: not an image file this tool reads ({', '.join(FORMAT_OF_EXTENSION)})")
    if output is None:
        dst = src.with_name(f"{src.stem}.{style_name}{src.suffix}")
    else:
        out = Path(output)
        if out.is_dir() or str(output).endswith(os.sep):
            dst = out / src.name
        else:
            dst = out
            if fmt is None and out.suffix.lower() in FORMAT_OF_EXTENSION:
                fmt = FORMAT_OF_EXTENSION[out.suffix.lower()]  # `-o out.png` asks for PNG
            elif out.suffix.lower() not in FORMAT_OF_EXTENSION and fmt is None:
                raise ValueError(f"{out}: the output needs an image extension ({', '.join(FORMAT_OF_EXTENSION)})")
    dst, f = _with_format(dst, fmt)
    return [Job(src, dst, f)]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop, which reading reports
        return False


def _check(job: Job, overwrite: bool, seen: dict[Path, Path]) -> str:
    """"convert" or "skipped"; raises ImageError when the job must not run."""
    if job.dst in seen:
        raise ImageError(job.src, f"its output {job.dst} is also the output of {seen[job.dst]}")
    seen[job.dst] = job.src
    if _same_file(job.src, job.dst):
        raise ImageError(job.src, "the output would replace the input; choose another output")
    if job.dst.exists() and not overwrite:
        return "skipped"
    return "convert"


def _done(value=None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    future.set_exception(error) if error is not None else future.set_result(value)
    return future


def convert(jobs: list[Job], stylize: Callable[[Picture], Picture], overwrite: bool = False, quality: int = 95,
            progress: bool = True, report: Callable[[str], None] | None = None, ahead: int = 2,
            max_pixels: int | None = None) -> Summary:
    """Convert every job, reporting each failure as one line; never stops at a bad file, only when the
    destination cannot be written at all (Summary.stopped says why).

    Decoding and encoding overlap with stylizing: two threads read up to `ahead` files ahead and write
    finished pictures behind (PIL and OpenCV release the GIL while they decode, encode and compress), so
    on a CPU the network is not left waiting for files, nor the disk for the network. At most `ahead`
    decoded pictures wait to be stylized and `ahead` stylized ones to be written, so memory stays
    bounded. Outcomes are counted and reported in the jobs' order.
    """
    from tqdm.auto import tqdm

    summary = Summary()
    bar = tqdm(total=len(jobs), unit="img", dynamic_ncols=True, disable=not progress or len(jobs) < 2)
    say = report or bar.write

    def record(job: Job, outcome: Future) -> None:
        try:
            result = outcome.result()
        except DestinationError as e:
            summary.failed.append((str(job.src), str(e)))
            summary.stopped = summary.stopped or str(e)
        except (ImageError, OSError) as e:
            reason = e.reason if isinstance(e, ImageError) else (e.strerror or str(e))
            summary.failed.append((str(job.src), reason))
            say(f"failed: {job.src}: {reason}")
        except RuntimeError as e:  # out of memory, and the like: this file fails, the rest go on
            summary.failed.append((str(job.src), str(e).splitlines()[0]))
            say(f"failed: {job.src}: {str(e).splitlines()[0]}")
        else:
            if result == "skipped":
                summary.skipped += 1
            else:
                summary.converted += 1
        bar.update()

    # What each job needs, decided up front (in order, so a clash names the first of two jobs).
    seen: dict[Path, Path] = {}
    checked: list[Future] = []
    for job in jobs:
        try:
            checked.append(_done(_check(job, overwrite, seen)))
        except ImageError as e:
            checked.append(_done(error=e))
    to_read = deque(i for i, c in enumerate(checked) if not c.exception() and c.result() == "convert")
    for folder in sorted({jobs[i].dst.parent for i in to_read}):
        remove_stale_temporaries(folder)  # what a run killed mid-write left behind
    read = functools.partial(read_image, max_pixels=max_pixels)

    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="styleshift-io")
    reads: dict[int, Future] = {}
    pending: deque[tuple[Job, Future]] = deque()  # outcomes not yet recorded, in the jobs' order
    try:
        for i, job in enumerate(jobs):
            if summary.stopped:
                break
            while to_read and len(reads) < ahead + 1 and to_read[0] <= i + ahead:
                reads[to_read[0]] = pool.submit(read, jobs[to_read[0]].src)
                to_read.popleft()
            outcome = checked[i]
            if i in reads:
                outcome = _stylized(reads.pop(i), job, stylize, pool, quality)
            pending.append((job, outcome))
            # Record what is finished; wait for the oldest only when `ahead` writes are queued.
            while pending and (pending[0][1].done() or len(pending) > ahead):
                record(*pending.popleft())
        while pending:
            record(*pending.popleft())  # why it stopped is in the summary (Summary.line), said once
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return summary


def _stylized(read: Future, job: Job, stylize: Callable[[Picture], Picture], pool: ThreadPoolExecutor,
              quality: int) -> Future:
    """Stylize a decoded picture here (the network runs in this thread) and write it in the pool."""
    try:
        picture = stylize(read.result())
    except (ImageError, OSError, RuntimeError) as e:
        return _done(error=e)

    def write() -> str:
        write_image(job.dst, picture, job.format, quality)
        return "converted"

    return pool.submit(write)


def shard(jobs: list[Job], rank: int, world_size: int) -> list[Job]:
    """Process `rank`'s share of `jobs` (the same list on every process: planning is deterministic).
    Jobs that would write the same output stay together, so `convert` still reports the clash."""
    first: dict[Path, int] = {}
    return [job for i, job in enumerate(jobs) if first.setdefault(job.dst, i) % world_size == rank]


def convert_shared(jobs: list[Job], stylize: Callable[[Picture], Picture], ctx, **options) -> Summary:
    """`convert` split over the processes of a torchrun job (`ctx`: styleshift.distributed.Context): each
    converts its share, and every process returns the summary of all of them."""
    try:
        summary = convert(shard(jobs, ctx.rank, ctx.world_size), stylize, **options)
    except Exception as e:
        if not ctx.distributed:
            raise
        # Not one file's fault. Reported with the rest rather than raised, so no process waits forever
        # for this one at the gathering below.
        reason = f"{type(e).__name__}: {e}"
        print(f"failed: process {ctx.rank} stopped: {reason}", file=sys.stderr)
        summary = Summary(failed=[(f"process {ctx.rank}", reason)])
    return functools.reduce(Summary.merge, ctx.gather(summary))
