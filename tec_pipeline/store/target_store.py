"""Zarr I/O of a target store (schema: `store/layout.py`): open, create or resume, read rows, write tasks.

A store is a Zarr v3 group at a local path, a `file://` URL or any fsspec URL (`memory://`, `s3://`, …).
`write_task` writes a task's data chunks, then its `done` flag, so a task killed half-way is simply redone.
Rows of tasks not done read as zeros with valid=False. Group attribute `tec` = the caller's attributes +
`format_version`, `codec`, `spec` (store/attributes.py).

Workers: a `TargetStore` pickles as its URL and mode only and opens the Zarr group lazily on first use, so it
can be handed to DataLoader workers (fork or spawn) and dask workers; each process opens its own handles.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from tec_pipeline import storage
from tec_pipeline.errors import UserError
from tec_pipeline.store.attributes import OWNED_ATTRS, VOLATILE_ATTRS, attr_diff, plain_attrs
from tec_pipeline.store.cleanup import remove_torn_writes
from tec_pipeline.store.codecs import Codec, create_array, get_codec, layout_mismatch
from tec_pipeline.store.layout import FORMAT_VERSION, StoreSpec, Task, check_encoded_rows, check_task_rows


def zarr_store(url: str, read_only: bool) -> Store:
    """A Zarr store for a local path, `file://` URL (LocalStore) or other fsspec URL (FsspecStore, opened with this
    process's storage options; an unusable URL is a UserError before any read or write)."""
    path = os.fspath(url)
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        storage.check_location(path, "store")
        return FsspecStore.from_url(path, storage_options=storage.current(), read_only=read_only)
    if os.path.isfile(path):
        raise UserError(f"{url} is a file, not a target store directory; pass the store's directory")
    return LocalStore(path, read_only=read_only)


async def _collect(items: AsyncIterator[str]) -> list[str]:
    return [item async for item in items]


async def _gather(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    return list(await asyncio.gather(*coros))


class TargetStore:
    """A target store opened lazily from its URL (layout: store/layout.py; workers: the module docstring)."""

    def __init__(self, url: str | os.PathLike[str], mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.url, self.mode = os.fspath(url), mode
        self._group: zarr.Group | None = None
        self._pid = -1  # process that opened _group: a forked child must open its own
        self._arrays: dict[str, zarr.Array] = {}
        self._tec: dict[str, Any] = {}
        self._spec: StoreSpec | None = None
        self._known_done: set[tuple[int, int]] = set()  # (view, task) seen done; a done flag is never cleared

    def __getstate__(self) -> dict[str, str]:
        # only the address travels: every process (loader worker, dask worker) opens its own Zarr handles
        return {"url": self.url, "mode": self.mode}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["url"], state["mode"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TargetStore({self.url!r}, mode={self.mode!r})"

    @classmethod
    def open(cls, url: str | os.PathLike[str], mode: str = "r") -> TargetStore:
        """Open an existing store ('r' or 'r+'); UserError if `url` holds none."""
        store = cls(url, mode)
        store._ensure_open()
        return store

    @classmethod
    def create_or_resume(cls, url: str | os.PathLike[str], spec: StoreSpec, attrs: dict[str, Any],
                         volatile: Iterable[str] = VOLATILE_ATTRS) -> TargetStore:
        """Create a store, or resume the one at `url` if its spec and attrs (minus `volatile` keys) match.

        attrs: plain dict of the run's identity (checkpoint sha256, manifest fingerprint, seed, …); keys in
        `volatile` (top-level names or dotted paths) are not compared. Never overwrites existing data: a store
        made with other settings, or a non-empty location that is not a store, raises UserError.
        """
        url, attrs = os.fspath(url), plain_attrs(attrs)
        if clash := set(attrs) & set(OWNED_ATTRS):
            raise ValueError(f"attributes {sorted(clash)} are owned by TargetStore; do not pass them")
        zstore = zarr_store(url, read_only=False)
        if not sync(zstore.exists("zarr.json")):
            if not sync(zstore.is_empty("")):
                raise UserError(f"{url} exists and is not a target store; choose another --out or delete it")
            tec = {**attrs, "format_version": FORMAT_VERSION, "codec": spec.codec, "spec": spec.to_dict()}
            try:
                zarr.open_group(zstore, mode="w-", attributes={"tec": tec})
            except zarr.errors.ContainsGroupError:
                pass  # another process created it just now: compare with what it wrote, below
        store = cls.open(url, mode="r+")
        stored_attrs = {k: v for k, v in store.attrs.items() if k not in OWNED_ATTRS}
        diffs = (attr_diff(store.spec.to_dict(), spec.to_dict(), frozenset())
                 + attr_diff(stored_attrs, attrs, frozenset(volatile)))
        if diffs:
            raise UserError(
                f"{url} holds a target store made with other settings ({'; '.join(diffs[:6])}); "
                "choose another --out or delete it"
            )
        if isinstance(zstore, LocalStore):
            remove_torn_writes(zstore.root)
        store._ensure_arrays()  # also completes a creation that was killed half-way
        return store

    def _ensure_open(self) -> zarr.Group:
        if self._group is not None and self._pid == os.getpid():
            return self._group
        zstore = zarr_store(self.url, read_only=self.mode == "r")
        if not sync(zstore.exists("zarr.json")):
            raise UserError(f"{self.url} is not a target store (no Zarr group there); check the path")
        try:
            group = zarr.open_group(zstore, mode=self.mode)
        except (zarr.errors.BaseZarrError, ValueError, KeyError) as e:
            raise UserError(f"{self.url} is not a target store ({e.__class__.__name__}); check the path") from e
        tec = group.attrs.get("tec")
        if not isinstance(tec, dict) or not isinstance(tec.get("spec"), dict):
            raise UserError(f"{self.url} is a Zarr group without target-store attributes; check the path")
        if tec.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.url} has store format {tec.get('format_version')!r}; this tec-pipeline reads format "
                f"{FORMAT_VERSION} — use the matching version or re-run tec cache-targets"
            )
        try:
            spec = StoreSpec.from_dict(tec["spec"])
        except (KeyError, TypeError) as e:
            raise UserError(f"{self.url} has damaged store attributes (spec: {e!r}); delete it and re-run") from e
        self._tec, self._spec, self._arrays = dict(tec), spec, {}
        self._group, self._pid = group, os.getpid()
        return group

    def _ensure_arrays(self) -> None:
        """Create missing arrays; UserError for an existing one whose shape, dtype or chunks differ."""
        group = self._ensure_open()
        for layout, leading, chunk_rows in self.spec.arrays():
            if layout.name not in group:
                try:
                    create_array(group, layout, leading, chunk_rows)
                    continue
                except zarr.errors.ContainsArrayError:  # another process created it just now: check it
                    group = zarr.open_group(group.store, mode=self.mode)
            if problem := layout_mismatch(group[layout.name], layout, leading, chunk_rows):
                raise UserError(f"{self.url}: {problem}; the store is damaged — delete it and re-run")

    @property
    def attrs(self) -> dict[str, Any]:
        """The group's `tec` attributes (a copy)."""
        self._ensure_open()
        return json.loads(json.dumps(self._tec))

    @property
    def spec(self) -> StoreSpec:
        self._ensure_open()
        assert self._spec is not None
        return self._spec

    @property
    def codec(self) -> Codec:
        return get_codec(self.spec.codec)

    def _array(self, name: str) -> zarr.Array:
        group = self._ensure_open()  # first, so a reopen after fork drops the parent's array handles
        if name not in self._arrays:
            # empty chunks are written too: a missing chunk then always means a task's data was lost
            self._arrays[name] = group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def tasks(self) -> list[Task]:
        """All V·T tasks, view-major."""
        spec = self.spec
        c, n = spec.chunk_rows, spec.rows
        return [Task(v, t, t * c, min(n, (t + 1) * c)) for v in range(spec.views) for t in range(spec.tasks_per_view)]

    def done_mask(self) -> np.ndarray:
        """bool [V, T]: task (v, t) has finished writing."""
        return np.asarray(self._array("done")[...], dtype=bool)

    def valid_mask(self) -> np.ndarray:
        """bool [V, N]: row produced (False for undecodable images and rows of tasks not done)."""
        return np.asarray(self._array("valid")[...], dtype=bool)

    def pending_tasks(self) -> list[Task]:
        done = self.done_mask()
        return [t for t in self.tasks() if not done[t.view, t.index]]

    def is_done(self, task: Task) -> bool:
        return bool(self._array("done")[task.view, task.index])

    def write_task(self, task: Task, features: np.ndarray | Mapping[str, np.ndarray],
                   attention: np.ndarray | Mapping[str, np.ndarray], topk_index: np.ndarray, boxes: np.ndarray,
                   valid: np.ndarray) -> None:
        """Write one task's rows (whole chunks), then mark it done.

        features: float32 (or float16) [n, L, D] normalised; attention: float [n, 1+k, H, L] logits; topk_index: int [n, k]
        in 0..L-1; boxes: int [n, 5] (top, left, height, width, flip); valid: bool [n]; n = task.rows.
        Invalid rows are stored as zeros whatever the inputs hold. features and attention may also come encoded
        (the codec part's arrays, as `TensorCodec.encode` returns them: stage 1 quantises on the device).
        """
        if self.mode != "r+":
            raise ValueError(f"{self} is open read-only")
        spec, codec = self.spec, self.codec
        targets = {"features": (features, codec.features, (spec.patches, spec.dim)),
                   "attention": (attention, codec.attention, (spec.queries, spec.heads, spec.patches))}
        raw = {name: value for name, (value, _, _) in targets.items() if not isinstance(value, Mapping)}
        rows = check_task_rows(spec, task, topk_index=topk_index, boxes=boxes, valid=valid, **raw)
        encoded = {}
        for name, (value, part, trailing) in targets.items():
            encoded.update(part.encode(rows.pop(name)) if name in raw
                           else check_encoded_rows(part, trailing, value, rows["valid"], name))
        encoded.update(rows)
        # the view axis kept (1, rows, ...): a value of exactly the chunk's shape is taken as the chunk as it is;
        # with the axis dropped Zarr fills a new chunk and copies the value into it (two passes over 77 MB per
        # ViT-B fp16 task; 1.2 -> ~0.9 CPU-ms per view). The same bytes are stored either way.
        region = (slice(task.view, task.view + 1), slice(task.row_start, task.row_stop))
        # all arrays at once: their chunks compress in parallel on Zarr's thread pool
        sync(_gather([self._array(k).async_array.setitem(region, v[None]) for k, v in encoded.items()]))
        self._array("done")[task.view, task.index] = True  # only after every data chunk is stored
        self._known_done.add((task.view, task.index))

    def reset_tasks(self, tasks: Iterable[Task]) -> None:
        """Mark `tasks` not done (their flag object is rewritten, also when it was damaged), so the next stage-1
        run recomputes and rewrites every chunk of them; other tasks are not touched (`tec cache-targets --repair`)."""
        if self.mode != "r+":
            raise ValueError(f"{self} is open read-only")
        for task in tasks:
            self._array("done")[task.view, task.index] = False
            self._known_done.discard((task.view, task.index))

    def read_rows(self, view: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one view, one slice read per array (concurrently), decoded.

        Returns features float32 [n, L, D], attention float32 [n, 1+k, H, L], topk_index int64 [n, k],
        boxes int32 [n, 5], valid bool [n]. Rows of tasks not done come back as zeros with valid False, also
        when their data is there (a writer killed between its data and its done flag).
        """
        spec = self.spec
        if not (0 <= view < spec.views and 0 <= start <= stop <= spec.rows):
            raise ValueError(f"rows [{start}, {stop}) of view {view} are outside the store ({spec.views}×{spec.rows})")
        names = spec.row_arrays
        region = (view, slice(start, stop))
        c = spec.chunk_rows
        first, last = start // c, -(-stop // c)  # tasks holding the rows
        check_done = any((view, t) not in self._known_done for t in range(first, last))
        reads = [self._array(k).async_array.getitem(region) for k in names]
        if check_done:  # read with the data, concurrently
            reads.append(self._array("done").async_array.getitem((view, slice(first, last))))
        results = sync(_gather(reads))
        stored = dict(zip(names, results[: len(names)], strict=True))
        codec = self.codec
        rows = {
            "features": codec.features.decode(stored),
            "attention": codec.attention.decode(stored),
            "topk_index": stored["topk_index"].astype(np.int64),
            "boxes": stored["boxes"],
            "valid": stored["valid"],
        }
        if check_done:
            done = np.asarray(results[-1], dtype=bool)
            self._known_done.update((view, first + int(t)) for t in np.flatnonzero(done))
            unfinished = ~np.repeat(done, c)[start - first * c : stop - first * c]
            for value in rows.values() if unfinished.any() else ():
                value[unfinished] = 0
        return rows

    def stored_bytes(self, prefix: str) -> int:
        """Total size of the objects under `prefix` ('' = the whole store), as stored."""
        return int(sync(self._ensure_open().store.getsize_prefix(prefix)))

    def keys_under(self, prefix: str) -> set[str]:
        """Object keys under `prefix` (e.g. 'features/'), as stored."""
        return set(sync(_collect(self._ensure_open().store.list_prefix(prefix))))

    def group(self) -> zarr.Group:
        """The open zarr group (opened on first use, reopened after a fork)."""
        return self._ensure_open()

    def array(self, name: str) -> zarr.Array:
        """The raw zarr array `name` (for integrity checks and tests; stages use read_rows/write_task)."""
        return self._array(name)
