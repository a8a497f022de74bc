"""The target store contract (design §3.4): the only code that reads or writes a store.

A store is a Zarr v3 group at a local path, a `file://` URL or any fsspec URL (`memory://`, `s3://`, …):

| array | shape | dtype | chunks |
|---|---|---|---|
| features (+ codec extras, codecs.py) | (V, N, L, D) | codec's | (1, C, L, D) |
| attention (+ codec extras) | (V, N, 1+k, H, L) | codec's | (1, C, 1+k, H, L) |
| topk_index | (V, N, k) | int16 | (1, C, k) |
| boxes | (V, N, 5) | int32: top, left, height, width, flip | (1, C, 5) |
| valid | (V, N) | bool | (1, C) |
| done | (V, T), T = ceil(N / C) | bool | **(1, 1)** |

`done` deviates from the design table's (1, T): every task sets its own flag, and Zarr has no locks, so with one
chunk per view two workers finishing tasks of the same view would read-modify-write the same object and one
flag could be lost. With (1, 1) each task owns its flag's object as it owns its data chunks.

A task is (view, chunk row-range) and owns exactly one chunk of every array; `write_task` writes its data
chunks, then its `done` flag, so a task killed half-way is simply redone. Rows of tasks not done read as zeros
with valid=False. Group attribute `tec` = the caller's attributes + `format_version`, `codec`, `spec`.

Workers: a `TargetStore` pickles as its URL and mode only and opens the Zarr group lazily on first use, so it
can be handed to DataLoader workers (fork or spawn) and dask workers; each process opens its own handles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from tec_pipeline.config import to_plain
from tec_pipeline.errors import UserError
from tec_pipeline.store.codecs import ArrayLayout, Codec, create_array, get_codec, layout_mismatch

FORMAT_VERSION = 1
VOLATILE_ATTRS = frozenset({"package_version", "version", "created", "created_at", "hostname"})
_OWNED_ATTRS = ("format_version", "codec", "spec")


@dataclass(frozen=True)
class StoreSpec:
    """Dimensions of a store: V views, N rows, L patches, D dim, H heads, k top rows, C rows per chunk."""

    views: int
    rows: int
    patches: int
    dim: int
    heads: int
    k: int
    chunk_rows: int
    codec: str

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "codec" and (not isinstance(value, int) or value < (0 if f.name == "k" else 1)):
                raise UserError(f"store {f.name} must be a positive integer, got {value!r}")
        if self.k > self.patches or self.patches > np.iinfo(np.int16).max:
            raise UserError(f"k={self.k} must not exceed the {self.patches} patches (and patches < 32768)")
        get_codec(self.codec)

    @property
    def queries(self) -> int:
        """Attention query rows stored per view: the CLS row + k patch rows."""
        return 1 + self.k

    @property
    def tasks_per_view(self) -> int:
        return math.ceil(self.rows / self.chunk_rows)

    def arrays(self) -> list[tuple[ArrayLayout, tuple[int, int], int]]:
        """(layout, leading shape, rows per chunk) of every array: the codec's, topk, boxes, valid, done."""
        per_row = [
            *get_codec(self.codec).layouts(self.patches, self.dim, self.queries, self.heads),
            ArrayLayout("topk_index", (self.k,), ("rank",), "int16", "zstd"),
            ArrayLayout("boxes", (5,), ("box",), "int32", "zstd"),
            ArrayLayout("valid", (), (), "bool", "zstd"),
        ]
        done = (ArrayLayout("done", (), (), "bool"), (self.views, self.tasks_per_view), 1)  # (1, 1): see above
        return [*[(lay, (self.views, self.rows), self.chunk_rows) for lay in per_row], done]

    @property
    def row_arrays(self) -> list[str]:
        """Names of the arrays with one entry per row (all but done)."""
        return [lay.name for lay, _, _ in self.arrays()][:-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Task:
    """One unit of stage-1 work: rows [row_start, row_stop) of one view = one chunk of every array."""

    view: int
    index: int
    row_start: int
    row_stop: int

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


def _zarr_store(url: str, read_only: bool) -> Store:
    """A Zarr store for a local path, `file://` URL (LocalStore) or other fsspec URL (FsspecStore)."""
    path = os.fspath(url)
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return FsspecStore.from_url(path, read_only=read_only)
    if os.path.isfile(path):
        raise UserError(f"{url} is a file, not a target store directory; pass the store's directory")
    return LocalStore(path, read_only=read_only)


def _remove_torn_writes(root: Path) -> None:
    """Delete `*.partial` files: Zarr's local atomic writes go to one and rename it into place, so a writer killed
    mid-write leaves it behind. Called before a run writes; a writer running right now elsewhere on the same
    store would lose its write (its task then fails and stays pending, to be redone)."""
    for leftover in root.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


async def _collect(items: AsyncIterator[str]) -> list[str]:
    return [item async for item in items]


async def _gather(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    return list(await asyncio.gather(*coros))


def _plain(attrs: dict[str, Any]) -> dict[str, Any]:
    """attrs as they will read back from JSON (tuples → lists, dataclasses → dicts)."""
    try:
        return json.loads(json.dumps(to_plain(attrs)))
    except TypeError as e:
        raise ValueError(f"store attributes must be JSON-serialisable: {e}") from e


def _short(value: Any) -> str:
    return text if len(text := repr(value)) <= 60 else text[:57] + "..."


def _diff(stored: Any, wanted: Any, skip: frozenset[str], path: str = "") -> list[str]:
    """Differences between two plain JSON values as 'dotted.path: stored X, requested Y' lines."""
    if not (isinstance(stored, dict) and isinstance(wanted, dict)):
        return [] if stored == wanted else [f"{path}: stored {_short(stored)}, requested {_short(wanted)}"]
    out: list[str] = []
    for key in sorted(set(stored) | set(wanted)):
        sub = f"{path}.{key}" if path else key
        if sub in skip:
            continue
        if key not in stored:
            out.append(f"{sub}: not in the store, requested {_short(wanted[key])}")
        elif key not in wanted:
            out.append(f"{sub}: stored {_short(stored[key])}, not requested")
        else:
            out += _diff(stored[key], wanted[key], skip, sub)
    return out


class TargetStore:
    """A target store opened lazily from its URL (see the module docstring for the layout)."""

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
        url, attrs = os.fspath(url), _plain(attrs)
        if clash := set(attrs) & set(_OWNED_ATTRS):
            raise ValueError(f"attributes {sorted(clash)} are owned by TargetStore; do not pass them")
        zstore = _zarr_store(url, read_only=False)
        if not sync(zstore.exists("zarr.json")):
            if not sync(zstore.is_empty("")):
                raise UserError(f"{url} exists and is not a target store; choose another --out or delete it")
            tec = {**attrs, "format_version": FORMAT_VERSION, "codec": spec.codec, "spec": spec.to_dict()}
            try:
                zarr.open_group(zstore, mode="w-", attributes={"tec": tec})
            except zarr.errors.ContainsGroupError:
                pass  # another process created it just now: compare with what it wrote, below
        store = cls.open(url, mode="r+")
        stored_attrs = {k: v for k, v in store.attrs.items() if k not in _OWNED_ATTRS}
        diffs = _diff(store.spec.to_dict(), spec.to_dict(), frozenset()) + _diff(stored_attrs, attrs, frozenset(volatile))
        if diffs:
            raise UserError(
                f"{url} holds a target store made with other settings ({'; '.join(diffs[:6])}); "
                "choose another --out or delete it"
            )
        if isinstance(zstore, LocalStore):
            _remove_torn_writes(zstore.root)
        store._ensure_arrays()  # also completes a creation that was killed half-way
        return store

    def _ensure_open(self) -> zarr.Group:
        if self._group is not None and self._pid == os.getpid():
            return self._group
        zstore = _zarr_store(self.url, read_only=self.mode == "r")
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
                create_array(group, layout, leading, chunk_rows)
            elif problem := layout_mismatch(group[layout.name], layout, leading, chunk_rows):
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

    def write_task(self, task: Task, features: np.ndarray, attention: np.ndarray, topk_index: np.ndarray,
                   boxes: np.ndarray, valid: np.ndarray) -> None:
        """Write one task's rows (whole chunks), then mark it done.

        features: float32 [n, L, D] normalised; attention: float [n, 1+k, H, L] logits; topk_index: int [n, k]
        in 0..L-1; boxes: int [n, 5] (top, left, height, width, flip); valid: bool [n]; n = task.rows.
        Invalid rows are stored as zeros whatever the inputs hold.
        """
        if self.mode != "r+":
            raise ValueError(f"{self} is open read-only")
        spec, codec = self.spec, self.codec
        rows = _task_rows(spec, task, features=features, attention=attention, topk_index=topk_index,
                          boxes=boxes, valid=valid)
        encoded = {**codec.features.encode(rows.pop("features")), **codec.attention.encode(rows.pop("attention")),
                   **rows}
        region = (task.view, slice(task.row_start, task.row_stop))
        # all arrays at once: their chunks compress in parallel on Zarr's thread pool
        sync(_gather([self._array(k).async_array.setitem(region, v) for k, v in encoded.items()]))
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

    def _keys(self, prefix: str) -> set[str]:
        return set(sync(_collect(self._ensure_open().store.list_prefix(prefix))))

    def _stored_bytes(self, prefix: str) -> int:
        return int(sync(self._ensure_open().store.getsize_prefix(prefix)))

    def describe(self) -> dict[str, Any]:
        """Summary for `tec inspect` (spec, progress, bytes per array); see `store.integrity.describe`."""
        from tec_pipeline.store.integrity import describe

        return describe(self)

    def check_integrity(self, read_data: bool = True) -> list[str]:
        """Reasons the store is incomplete or damaged (empty list: sound); see `store.integrity`."""
        from tec_pipeline.store.integrity import check_integrity

        return check_integrity(self, read_data)

    def stored_bytes(self, prefix: str) -> int:
        """Total size of the objects under `prefix` ('' = the whole store), as stored."""
        return self._stored_bytes(prefix)

    def keys_under(self, prefix: str) -> set[str]:
        """Object keys under `prefix` (e.g. 'features/'), as stored."""
        return self._keys(prefix)

    def group(self) -> zarr.Group:
        """The open zarr group (opened on first use, reopened after a fork)."""
        return self._ensure_open()

    def array(self, name: str) -> zarr.Array:
        """The raw zarr array `name` (for integrity checks and tests; stages use read_rows/write_task)."""
        return self._array(name)


def _task_rows(spec: StoreSpec, task: Task, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """A task's inputs checked against the spec, invalid rows zeroed, cast to their stored dtypes."""
    c, n = spec.chunk_rows, task.rows
    if task != Task(task.view, task.index, task.index * c, min(spec.rows, (task.index + 1) * c)) or not (
        0 <= task.view < spec.views and 0 <= task.index < spec.tasks_per_view
    ):
        raise ValueError(f"{task} is not a task of this store ({spec})")
    wanted = {  # valid first: the others are zeroed where it is False
        "valid": ((n,), np.bool_),
        "features": ((n, spec.patches, spec.dim), np.float32),
        "attention": ((n, spec.queries, spec.heads, spec.patches), np.float32),
        "topk_index": ((n, spec.k), np.int16),
        "boxes": ((n, 5), np.int32),
    }
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in wanted.items():
        value = np.asarray(inputs[name])
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} for {task}")
        if name != "valid" and not out["valid"].all():
            value = np.where(out["valid"].reshape(-1, *[1] * (value.ndim - 1)), value, 0)
        if np.issubdtype(dtype, np.signedinteger) and value.size:
            lo, hi = (0, spec.patches - 1) if name == "topk_index" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
            if value.min() < lo or value.max() > hi:
                raise ValueError(f"{name} must lie in {lo}..{hi}")  # checked before the cast can wrap
        out[name] = value.astype(dtype, copy=False)  # a task can be hundreds of MB: no needless copies
    return out
