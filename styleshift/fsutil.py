"""Atomic file writes: a reader, or a crash, never sees half a file.

A file is written to a hidden temporary name beside its destination, flushed to disk (fsync) and renamed
over it. A process killed mid-write leaves at most that temporary file, never a partial file under the
final name; `remove_stale_temporaries` clears such leftovers when a later run starts in the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
# .<name>.<host>.<pid>.<random>.tmp: the host and process tell whether the writer may still be alive.
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")

# Errors of the destination, not of one file: every later write there would fail the same way. Permission
# errors count only when a file cannot even be created in the folder (a read-only or forbidden folder): one
# output locked by another program (Windows) or made read-only fails alone.
DESTINATION_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
CREATION_ERRNOS = DESTINATION_ERRNOS | {errno.EACCES, errno.EPERM}


class DestinationError(OSError):
    """A write failed because of where it goes (disk full, read-only, no permission), not what it is."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for writing; on success it is renamed over `path` (an atomic
    step on POSIX and Windows), on failure it is removed and `path` is left as it was.

    Failures of the destination (disk full, read-only folder, no permission) are raised as
    DestinationError, so a caller can stop at once instead of failing each later file the same way."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkstemp: its files are private (0600); this one gets the usual permissions (umask).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _classified(e, path, CREATION_ERRNOS) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DESTINATION_ERRNOS and not isinstance(e, DestinationError):
            raise _classified(e, path) from None
        raise


def _classified(e: OSError, path: Path, destination_errnos: set[int] = DESTINATION_ERRNOS) -> OSError:
    if e.errno in destination_errnos:
        return DestinationError(e.errno, f"cannot write {path}: {os.strerror(e.errno)}")
    return e


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut too (POSIX; Windows has no such call)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename itself is done
        pass
    finally:
        os.close(fd)


def atomic_link(target: str | os.PathLike, path: str | os.PathLike, symbolic: bool = False) -> bool:
    """Make `path` a link to `target` (a hard link, or a symbolic one holding `target` as given), switched in
    with one rename like atomic_open's files. False, with nothing changed, where the filesystem or the
    system refuses links (FAT, across filesystems, Windows without the privilege): the caller copies."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        (os.symlink if symbolic else os.link)(target, tmp)
    except (OSError, NotImplementedError):
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_folder(path.parent)
    return True


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike) -> None:
    with open(src, "rb") as f:
        atomic_write(path, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    with atomic_open(path) as f:
        write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _abandoned(path: Path, pid: int) -> bool:
    """Whether the writer of a temporary file on this machine is gone."""
    if os.name != "posix":
        # os.kill(pid, 0) is no probe on Windows (signal 0 is CTRL_C_EVENT): go by age instead; no write
        # stays untouched for a day.
        try:
            return time.time() - path.stat().st_mtime > 86400
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's process, or no way to tell: leave its file alone
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left in `folder`: ours (by name), made on
    this machine, by a process that no longer runs. A writer on another machine sharing the folder, or
    one still running here, is left alone. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    candidates = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in candidates:
        m = _TEMPORARY.match(path.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and _abandoned(path, int(m["pid"])):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed
