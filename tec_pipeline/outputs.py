"""Output checks shared by every command that writes: is the destination writable, and a failed write as one line.

Commands check their output location before any long work (knn before computing features, stage 1 before
the base model runs), and turn a write that fails half-way (full disk, read-only file system, quota) into a
UserError that says what failed and that earlier output is intact, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from tec_pipeline.errors import UserError

# errnos of "the destination cannot take this write"; anything else is a bug and keeps its traceback
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG})


def is_local(path: str | os.PathLike[str]) -> bool:
    """A local path or file:// URL (fsspec URLs such as memory:// or s3:// are checked by their own writes)."""
    text = os.fspath(path)
    return text.startswith("file://") or "://" not in text


def _local(path: str | os.PathLike[str]) -> Path:
    text = os.fspath(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


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


def require_writable(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """UserError unless `path` (a file or directory, existing or to be created) can be written."""
    if not is_local(path):
        return
    target = _local(path)
    base = _existing_ancestor(target)
    if not base.is_dir():
        raise UserError(f"{flag} {target}: {base} is a file, not a directory; choose another {flag}")
    try:
        probe_write(base)
    except OSError as e:
        raise UserError(f"{flag} {target} is not writable ({base}: {e.strerror or e}, errno {e.errno}); "
                        f"choose a writable {flag}") from None


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
