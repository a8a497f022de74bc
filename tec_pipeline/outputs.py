"""Output checks shared by every command that writes: is the destination writable, and a failed write as one line.

Commands check their output location before any long work (knn before computing features, stage 1 before
the base model runs), and turn a write that fails half-way (full disk, read-only file system, quota) into a
UserError that says what failed and that earlier output is intact, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tec_pipeline.errors import UserError
from tec_pipeline.storage import is_url, local_path

# errnos of "the destination cannot take this write"; anything else is a bug and keeps its traceback
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG})


def is_local(path: str | os.PathLike[str]) -> bool:
    """A local path or file:// URL (fsspec URLs such as memory:// or s3:// are checked by their own writes)."""
    return not is_url(path)


def _local(path: str | os.PathLike[str]) -> Path:
    return Path(local_path(path))


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_write(directory: Path) -> None:
    """Create and remove a file in `directory`: the only test that also holds for root and for read-only mounts
    (os.access says yes to root on a read-only bind mount)."""
    probe = directory / f".tec-write-probe-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.unlink(probe)


def require_writable(path: str | os.PathLike[str], flag: str = "--out", file: bool = False) -> None:
    """UserError unless `path` (a directory, or with `file` a file; existing or to be created) can be written.

    An existing file is fine for a file output: every file output is written under a temporary name and then
    renamed over it, so what counts is its directory."""
    if not is_local(path):
        return
    target = _local(path)
    if file and target.is_dir():
        raise UserError(f"{flag} {target} is a directory; {flag} takes a file name")
    base = _existing_ancestor(target.parent if file and target.is_file() else target)
    if not base.is_dir():
        raise UserError(f"{flag} {target}: {base} is a file, not a directory; choose another {flag}")
    try:
        probe_write(base)
    except OSError as e:
        raise UserError(f"{flag} {target} is not writable ({base}: {e.strerror or e}, errno {e.errno}); "
                        f"choose a writable {flag}") from None


def require_free_space(path: str | os.PathLike[str], needed: int, what: str, kept: str) -> None:
    """UserError when the file system of `path` has less than `needed` bytes free: checked before a long write,
    so it fails at the start rather than hours in. `what` names the write, `kept` what earlier output survives."""
    if not is_local(path):
        return
    free = shutil.disk_usage(_existing_ancestor(_local(path))).free
    if free < needed:
        raise UserError(f"{what} need about {_size(needed)}, but {_local(path)} has {_size(free)} free; free space "
                        f"or choose another --out ({kept})")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_failure(e: OSError, what: str, kept: str) -> UserError:
    """A UserError for a write to `what` that failed with `e`; `kept` says what earlier output is intact."""
    where = e.filename or what
    return UserError(f"cannot write {where}: {e.strerror or e} (errno {e.errno}); {kept}")


@contextlib.contextmanager
def write_errors(what: str, kept: str) -> Iterator[None]:
    """Turn an OSError of a write that the destination refused (full disk, read-only, quota) into one line."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_failure(e, what, kept) from None
