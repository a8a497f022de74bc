"""Filesystem cleanup of a local store: the temporary files of writers that died mid-write.

Only a local store has them (Zarr's LocalStore writes to `*.partial` and renames; object stores put whole
objects). Claims (claims.py) tell a dead writer's file from one being written right now.
"""

from __future__ import annotations

import time
from pathlib import Path

from tec_pipeline.store.claims import live_tasks

METADATA_PARTIAL_AGE_S = 30.0  # a zarr.json write takes milliseconds: an older temporary file is a dead write's


def _partial_task(root: Path, leftover: Path) -> tuple[int, int] | None:
    """(view, task) whose chunk `leftover` (ARRAY/c/VIEW/TASK/...*.partial) was being written, None for metadata."""
    parts = leftover.relative_to(root).parts
    if len(parts) >= 4 and parts[1] == "c" and parts[2].isdigit() and parts[3].split(".")[0].isdigit():
        return int(parts[2]), int(parts[3].split(".")[0])
    return None


def remove_torn_writes(root: Path) -> None:
    """Delete `*.partial` files of dead writers: Zarr's local atomic writes go to one and rename it into place, so
    a writer killed mid-write leaves it behind. A chunk's temporary file is kept while its task has a live claim
    (claims.py: another writer is writing it right now); a metadata one while it is younger than
    METADATA_PARTIAL_AGE_S (a concurrent creation of the same store)."""
    live, now = live_tasks(root), time.time()
    for leftover in root.rglob("*.partial"):
        task = _partial_task(root, leftover)
        try:
            if task in live or (task is None and now - leftover.stat().st_mtime < METADATA_PARTIAL_AGE_S):
                continue
        except FileNotFoundError:
            continue  # its writer just renamed it into place
        leftover.unlink(missing_ok=True)
