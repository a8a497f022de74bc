"""Task claims: several writers (processes, ranks, hosts) on one local store never write the same task.

A claim is a file `v{view}-t{task}` in `STORE.claims/` beside the store (inside it, Zarr would warn about a
non-Zarr member on every listing), created atomically (O_CREAT | O_EXCL) before the task is computed and
removed after its done flag is written. It names its owner (host, pid, a per-process
token) and its mtime is the heartbeat, refreshed every HEARTBEAT_S by a daemon thread while it is held.

A claim is live while its heartbeat is younger than STALE_S and, on the claimant's own host, its process
exists; otherwise it is stale and may be taken over: it is renamed to a unique name (only one taker's rename
wins), checked to still be the claim judged stale, and replaced with a new O_EXCL claim. Torn-write cleanup
(store/cleanup.py) deletes a `*.partial` file only when the task it belongs to has no live claim.

Stores at other fsspec URLs (memory://, s3://) have no claims: one writer at a time there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
HEARTBEAT_S = 5.0
STALE_S = 60.0
_HOST = socket.gethostname()


class Task(Protocol):
    """What a claim needs of a task (layout.Task; a protocol keeps claims free of the schema)."""

    view: int
    index: int


def claims_dir(root: Path) -> Path:
    return root.with_name(root.name + ".claims")


def claim_path(root: Path, view: int, index: int) -> Path:
    return claims_dir(root) / f"v{view}-t{index}"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or being written this instant (then its mtime is fresh: see is_live)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(path: Path, now: float | None = None) -> bool:
    """Whether the claim at `path` is held by a live writer (see the module docstring)."""
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    owner = _read(path)
    if owner and owner.get("host") == _HOST and not _pid_alive(int(owner.get("pid", -1))):
        return False
    return age < STALE_S


def live_tasks(root: Path) -> set[tuple[int, int]]:
    """(view, task) of every live claim in the store at `root`."""
    out = set()
    for path in claims_dir(root).glob("v*-t*"):
        view, _, index = path.name[1:].partition("-t")
        if view.isdigit() and index.isdigit() and is_live(path):
            out.add((int(view), int(index)))
    return out


class ClaimBook:
    """The claims this process holds on the store at `root` (None: a store without claims, all granted)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.owner = {"host": _HOST, "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._held: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refused = 0  # tasks left to another live writer

    def claim(self, tasks: list[Task]) -> bool:
        """Claim every task of `tasks` (one chunk group) or none: False when another live writer holds one."""
        if self.root is None:
            return True
        got = []
        for task in tasks:
            path = claim_path(self.root, task.view, task.index)
            if not self._take(path):
                for held in got:
                    self._drop(held)
                self.refused += len(tasks)
                return False
            got.append(path)
        self._start_heartbeat()
        return True

    def owns(self, task: Task) -> bool:
        """Whether this process holds `task`'s claim (always, on a store without claims)."""
        return self.root is None or claim_path(self.root, task.view, task.index) in self._held

    def release(self, task: Task) -> None:
        """Drop the claim of a finished task (after its done flag is written)."""
        if self.root is not None:
            self._drop(claim_path(self.root, task.view, task.index))

    def close(self) -> None:
        """Stop the heartbeat and drop every claim still held (tasks not finished become free at once)."""
        self._stop.set()
        for path in list(self._held):
            self._drop(path)
        if self.root is not None:
            try:
                claims_dir(self.root).rmdir()  # only when empty: no other writer holds a claim
            except OSError:
                pass

    def _take(self, path: Path) -> bool:
        if self._create(path):
            return True
        seen = _read(path)
        if is_live(path):
            return False
        # stale: move it aside under a unique name; of several takers only one rename finds it
        aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return self._create(path)
        if _read(aside) != seen:  # another taker's fresh claim was renamed: put it back, leave the task
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        log.info("took over a stale claim %s (held by %s)", path.name, seen)
        return self._create(path)

    def _create(self, path: Path) -> bool:
        for _ in range(3):  # the directory may be removed by a writer that just finished
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue
        else:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        with self._lock:
            self._held.add(path)
        return True

    def _drop(self, path: Path) -> None:
        with self._lock:
            self._held.discard(path)
        if _read(path) == self.owner:  # never remove a claim that another writer has taken over
            path.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="tec-claims", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                held = list(self._held)
            for path in held:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass


def local_root(url: str | os.PathLike[str]) -> Path | None:
    """The directory of a store on the local filesystem (path or file:// URL), None for other fsspec URLs."""
    path = os.fspath(url)
    if "://" in path and not path.startswith("file://"):
        return None
    return Path(path.removeprefix("file://")).absolute()
