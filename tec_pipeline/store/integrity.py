"""Inspection and integrity of a target store: the `tec inspect` summary, and the `tec verify` checks (arrays
against the spec, done flags, every chunk of a done task present and decodable, CRC32C included, to finite
values).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from tec_pipeline.errors import UserError
from tec_pipeline.store.codecs import ArrayLayout, layout_mismatch
from tec_pipeline.store.layout import FORMAT_VERSION, Task
from tec_pipeline.store.target_store import TargetStore


def check_integrity(store: TargetStore, read_data: bool = True, progress: bool = False) -> list[str]:
    """Reasons the store is incomplete or damaged, as one-line strings (empty list: sound).

    Checks every array against the spec (present, shape, dtype, chunks), lists tasks not done, and for
    each done task checks that every array's chunk object exists and (read_data) decodes — CRC32C
    included — to finite values. read_data=False skips the full read. `progress`: a tqdm bar over the chunks
    checked (the stage passes logs.progress_enabled()).
    """
    reasons, sound = _array_problems(store)
    if "done" not in {lay.name for lay in sound}:
        return [*reasons, "cannot tell which tasks are done"]
    done, flags = _readable_done(store)
    reasons += [reason for _, reason in flags]
    tasks = store.tasks()
    for view in range(store.spec.views):
        pending = [t.index for t in tasks if t.view == view and not done[view, t.index]]
        if pending:
            listed = ", ".join(map(str, pending[:10])) + (", ..." if len(pending) > 10 else "")
            reasons.append(f"view {view}: {len(pending)} of {done.shape[1]} tasks not done (tasks {listed})")
    done_tasks = [t for t in tasks if done[t.view, t.index]]
    checked = [layout for layout in sound if layout.name != "done"]
    with tqdm(total=len(checked) * len(done_tasks), desc="chunks checked", unit="chunk", disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for layout in checked:
            reasons += [reason for _, reason in _chunk_problems(store, layout, done_tasks, read_data, bar.update)]
    return reasons


def damaged_tasks(store: TargetStore) -> list[Task]:
    """Tasks marked done whose chunks are missing, do not decode or hold non-finite values, and tasks whose done
    flag does not decode: what `cache-targets --repair` recomputes. Raises UserError when an array itself is
    missing or has the wrong layout (no task-level repair can fix that)."""
    reasons, sound = _array_problems(store)
    if reasons:
        raise UserError(f"{store.url} cannot be repaired task by task ({'; '.join(reasons)}); delete it and rerun "
                        "tec cache-targets")
    done, flags = _readable_done(store)
    done_tasks = [t for t in store.tasks() if done[t.view, t.index]]
    bad = {task for task, _ in flags}
    for layout in sound:
        if layout.name != "done":
            bad |= {task for task, _ in _chunk_problems(store, layout, done_tasks, read_data=True)}
    return sorted(bad, key=lambda t: (t.view, t.index))


def reset_damaged_tasks(url: str) -> list[Task]:
    """Find the damaged tasks of the store at `url` and mark them not done; returns them (view-major)."""
    store = TargetStore.open(url, mode="r+")
    damaged = damaged_tasks(store)
    store.reset_tasks(damaged)
    return damaged


def require_readable_flags(url: str) -> None:
    """UserError naming the damaged done flags of an existing store (cheap: one tiny object per task), so a stage-1
    rerun says to repair instead of failing in a checksum traceback; a missing store is left to stage 1."""
    try:
        store = TargetStore.open(url)
    except UserError:
        return  # not a store (yet): creating or refusing it is stage 1's business
    if "done" not in {layout.name for layout in _array_problems(store)[1]}:
        return  # killed while being created: stage 1 completes it
    _, flags = _readable_done(store)
    if flags:
        raise UserError(f"{url}: {'; '.join(reason for _, reason in flags[:5])}; rerun with --repair to recompute "
                        "those tasks")


@contextlib.contextmanager
def damage_explained(store: TargetStore, view: int, start: int, stop: int) -> Iterator[None]:
    """Reading rows [start, stop) of `view`: a chunk that fails to decode (checksum, truncation, missing object)
    becomes a UserError naming the chunk and the repair, instead of a codec traceback deep inside a loader."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 — any decode failure of stored bytes means damage
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(f"target store {store.url}: the chunk of view {view} rows {start}-{stop} does not decode "
                        f"({e.__class__.__name__}{': ' + detail if detail else ''}); run `tec verify {store.url} "
                        "--shards DIR` to list the damage and `tec cache-targets ... --repair` (the store's own "
                        "command) to recompute it") from None


def store_fingerprint(store: TargetStore) -> str:
    """sha256 of what a store holds, for a training run's identity: its attributes minus the package version and
    the base model's path (its sha256 stays), and which tasks are done."""
    attrs = store.attrs
    attrs.pop("package_version", None)
    attrs.get("base_model", {}).pop("source", None)
    done = np.ascontiguousarray(store.done_mask()).tobytes()
    text = json.dumps(attrs, sort_keys=True) + hashlib.sha256(done).hexdigest()
    return hashlib.sha256(text.encode()).hexdigest()


def _array_problems(store: TargetStore) -> tuple[list[str], list[ArrayLayout]]:
    """(reasons, sound layouts): every array of the spec, present with its shape, dtype and chunks."""
    group, reasons, sound = store.group(), [], []
    for layout, leading, chunk_rows in store.spec.arrays():
        problem = layout_mismatch(group[layout.name], layout, leading, chunk_rows) if layout.name in group else (
            f"array {layout.name} is missing")
        reasons += [problem] if problem else []
        sound += [] if problem else [layout]
    return reasons, sound


def _readable_done(store: TargetStore) -> tuple[np.ndarray, list[tuple[Task, str]]]:
    """done [V, T] and the tasks whose flag does not decode (they count as not done)."""
    try:
        return store.done_mask(), []
    except Exception:  # noqa: BLE001 — a damaged flag object; find which, flag by flag
        done = np.zeros((store.spec.views, store.spec.tasks_per_view), dtype=bool)
        damaged = []
        for task in store.tasks():
            try:
                done[task.view, task.index] = store.is_done(task)
            except Exception as e:  # noqa: BLE001 — any decode failure means a damaged object
                damaged.append((task, f"done flag of view {task.view} task {task.index} does not decode "
                                      f"({e.__class__.__name__})"))
        return done, damaged


def _chunk_problems(store: TargetStore, layout: ArrayLayout, tasks: list[Task], read_data: bool,
                    advance: Callable[[int], Any] = lambda n: None) -> list[tuple[Task, str]]:
    """(task, reason) for each done task whose chunk of `layout` is missing, undecodable or non-finite;
    `advance(1)` after each task (a progress bar's update)."""
    arr, keys, out = store.array(layout.name), store.keys_under(f"{layout.name}/"), []
    for task in tasks:
        advance(1)
        where = f"view {task.view} task {task.index} (rows {task.row_start}-{task.row_stop})"
        key = f"{layout.name}/{arr.metadata.encode_chunk_key((task.view, task.index, *[0] * len(layout.trailing)))}"
        if key not in keys:
            out.append((task, f"{layout.name}: chunk of done {where} is missing"))
            continue
        if not read_data:
            continue
        try:
            values = arr[task.view, task.row_start : task.row_stop]
        except Exception as e:  # noqa: BLE001 — any decode failure means a damaged object; keep checking
            out.append((task, f"{layout.name}: chunk of {where} does not decode ({e.__class__.__name__})"))
            continue
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            out.append((task, f"{layout.name}: chunk of {where} holds non-finite values"))
    return out


def describe(store: TargetStore) -> dict[str, Any]:
    """Summary for `tec inspect`: spec, progress, invalid rows, bytes per array, attributes.

    Per array: stored_bytes = sizes of its chunk objects as stored (compressed), raw_bytes = its full
    uncompressed size, and both per image-view (stored over the rows of done tasks, raw over V·N) — the
    figure of tec-method §9. The top-level stored_bytes counts every object, metadata included.
    """
    spec, done = store.spec, store.done_mask()
    row_done = np.repeat(done, spec.chunk_rows, axis=1)[:, : spec.rows]
    rows_done = int(row_done.sum())
    arrays: dict[str, dict[str, Any]] = {}
    for name in [*spec.row_arrays, "done"]:
        arr = store.array(name)
        stored, raw = store.stored_bytes(f"{name}/c/"), math.prod(arr.shape) * arr.dtype.itemsize
        arrays[name] = {
            "shape": list(arr.shape), "chunks": list(arr.chunks), "dtype": str(arr.dtype),
            "stored_bytes": stored, "raw_bytes": raw,
            "stored_bytes_per_image_view": stored / rows_done if rows_done else None,
            "raw_bytes_per_image_view": raw / (spec.views * spec.rows),
        }
    total = store.stored_bytes("")
    return {
        "url": store.url, "format_version": FORMAT_VERSION, "codec": spec.codec, "spec": spec.to_dict(),
        "views": spec.views, "rows": spec.rows, "chunk_rows": spec.chunk_rows,
        "tasks_total": int(done.size), "tasks_done": int(done.sum()), "rows_done": rows_done,
        "invalid_rows": int((row_done & ~store.valid_mask()).sum()),
        "stored_bytes": total, "stored_bytes_per_image_view": total / rows_done if rows_done else None,
        "arrays": arrays, "attrs": store.attrs,
    }
