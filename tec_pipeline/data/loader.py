"""Streaming loader for training and evaluation: design §4 (stage 2), shared by MAE, TEC cached and online.

Per epoch the shard order is permuted with (seed, epoch); the concatenated row stream is cut into equal
contiguous pieces, one per (rank, loader worker) *unit*, so shards are still read sequentially (and a store's
target rows in contiguous slices) while every rank gets the same number of samples even when shards are fewer
than units. When the item function knows beforehand which rows are valid (a target store's `valid` and `done`),
the pieces hold equal numbers of *valid* rows and invalid rows are never read: every unit can fill its batches.

Each unit shuffles its rows through a seeded shuffle buffer and batches them: batch j is the next B rows of
that order that yield an item, so a row that turns out unusable (an undecodable image) is replaced by the
following rows of the same unit; a batch is never short or empty. The order is computed up front from row ids
(and the known-valid mask) alone, so resuming at batch b reproduces the rest of the epoch exactly, and the
DataLoader's round-robin over workers is deterministic: global batch g of a rank comes from worker g % W.
Resume with the same --workers.

Memory per worker is bounded by the shuffle buffer: rows wait there in compact form (encoded image bytes, the
item function's `stored` row, e.g. targets in their codec form) and are decoded only when emitted.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tec_pipeline.data.shards import (
    Manifest,
    Sample,
    ShardInfo,
    decode_fields,
    iter_samples,
    iter_shard_fields,
    load_manifest,
)
from tec_pipeline.data.views import center_view_uint8, normalize, replay_view_uint8, sample_view
from tec_pipeline.errors import UserError

log = logging.getLogger(__name__)
# rows each loader worker holds in compact form; see the README for the per-worker memory formula
DEFAULT_SHUFFLE_BUFFER = 256
PREFETCH_BATCHES = 2  # per worker: enough to hide a decode hiccup, each one is B decoded rows in shared memory

# An item function turns a decoded sample into a dict of tensors, or None to drop it (undecodable, invalid row).
# Optional attributes: `stored(row)` -> compact per-row data read while streaming (then called as
# item_fn(sample, stored)); `known_valid()` -> bool [N] of the rows that can yield an item (rows outside it are
# never read); `validity_known = True` when every row of known_valid() does yield one (resume skips unread).
ItemFn = Callable[..., "dict[str, Any] | None"]


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) (global row ids) of one shard."""

    shard: ShardInfo
    start: int
    stop: int


@dataclass(frozen=True)
class UnitPlan:
    """One unit's epoch: the segments it reads, its rows in emission order, and how many batches it makes."""

    segments: tuple[Segment, ...]
    stream: np.ndarray  # [S] row ids in the order the shuffle buffer emits them (known-valid rows only)
    n_batches: int
    batch_size: int

    @property
    def batches(self) -> np.ndarray:
        """[n_batches, batch_size] row ids as planned (rows that yield no item shift the rest)."""
        return self.stream[: self.n_batches * self.batch_size].reshape(self.n_batches, self.batch_size)


def _rows_used(manifest: Manifest, limit: int | None) -> int:
    return manifest.total_rows if limit is None else min(limit, manifest.total_rows)


def batches_per_unit(total_rows: int, batch_size: int, units: int) -> int:
    return (total_rows // units) // batch_size


def valid_rows_per_unit(masks: list[np.ndarray], rows: int, units: int) -> int:
    """Valid rows every unit gets when each epoch's piece is cut by valid rows: the smallest view's share."""
    return min(int(np.count_nonzero(mask[:rows])) for mask in masks) // units


def steps_per_epoch(shards_dir: str | Path, batch_size: int, world_size: int = 1, workers: int = 0,
                    limit: int | None = None, manifest: Manifest | None = None,
                    valid_per_unit: int | None = None) -> int:
    """Batches every rank runs per epoch (identical on all ranks).

    valid_per_unit: when the pieces are cut by known-valid rows (`valid_rows_per_unit`), their size; UserError
    when a unit cannot fill one batch, naming the rows needed.
    """
    manifest = manifest or load_manifest(shards_dir)
    per_rank_units = max(workers, 1)
    units = world_size * per_rank_units
    total = _rows_used(manifest, limit)
    if valid_per_unit is not None:
        steps = per_rank_units * (valid_per_unit // batch_size)
        if steps == 0:
            raise UserError(f"each of the {units} loader units ({world_size} rank(s) x {per_rank_units} worker(s)) "
                            f"gets {valid_per_unit} valid rows and needs at least {batch_size} (one batch): "
                            f"{units * batch_size} valid rows in every view used; finish the store with "
                            "cache-targets, or lower --batch-size or --workers")
        return steps
    steps = per_rank_units * batches_per_unit(total, batch_size, units)
    if steps == 0:
        raise UserError(f"{total} images are too few for batch size {batch_size} on {world_size} rank(s) x "
                        f"{per_rank_units} loader worker(s); lower --batch-size or --workers")
    return steps


def _shard_ranges(manifest: Manifest, order: np.ndarray, total: int) -> list[tuple[ShardInfo, int, int]]:
    """(shard, first row, stop row) in stream order, rows past `total` left out."""
    out = []
    for index in order:
        shard = manifest.shards[int(index)]
        start, stop = shard.first_row, min(shard.first_row + shard.count, total)
        if stop > start:
            out.append((shard, start, stop))
    return out


def _unit_segments(ranges: list[tuple[ShardInfo, int, int]], lo: int, hi: int,
                   cumulative: np.ndarray | None) -> list[Segment]:
    """The segments holding positions [lo, hi) of the stream, counted in rows or, with `cumulative`
    (cumulative[i] = valid rows before row i), in valid rows."""
    segments, offset = [], 0
    for shard, start, stop in ranges:
        n = stop - start if cumulative is None else int(cumulative[stop] - cumulative[start])
        a, b = max(lo - offset, 0), min(hi - offset, n)
        if a < b:
            if cumulative is None:
                segments.append(Segment(shard, start + a, start + b))
            else:  # first rows after which a (b) valid rows of the shard have passed
                base = cumulative[start]
                first, last = np.searchsorted(cumulative, [base + a + 1, base + b], side="left")
                segments.append(Segment(shard, int(first) - 1, int(last)))
        offset += n
    return segments


def _buffer_shuffle(rows: np.ndarray, rng: np.random.Generator, buffer_size: int) -> np.ndarray:
    """The order a streaming shuffle buffer of `buffer_size` emits `rows` in (webdataset-style)."""
    out, buf = [], []
    picks = iter(rng.integers(0, 1 << 62, size=len(rows)))
    for row in rows.tolist():
        if len(buf) < buffer_size:
            buf.append(row)
            continue
        i = int(next(picks)) % len(buf)
        out.append(buf[i])
        buf[i] = row
    rng.shuffle(buf)
    return np.asarray(out + buf, dtype=np.int64)


def plan_epoch(manifest: Manifest, seed: int, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1,
               workers: int = 0, limit: int | None = None, shuffle: bool = True,
               shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, valid: np.ndarray | None = None,
               valid_per_unit: int | None = None) -> list[UnitPlan]:
    """One UnitPlan per loader worker of `rank` (one when workers == 0).

    valid: bool [N] rows known to yield an item; the pieces then hold `valid_per_unit` valid rows each
    (default: an equal share of this mask's) and only those rows are streamed.
    """
    per_rank_units = max(workers, 1)
    units = world_size * per_rank_units
    total = _rows_used(manifest, limit)
    order = (np.random.default_rng([seed, epoch, 1]).permutation(len(manifest.shards)) if shuffle
             else np.arange(len(manifest.shards)))
    ranges = _shard_ranges(manifest, order, total)
    cumulative = None
    if valid is None:
        per_unit = total // units
    else:
        mask = np.zeros(total, dtype=bool)
        mask[: min(total, len(valid))] = valid[:total]
        cumulative = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        per_unit = valid_per_unit if valid_per_unit is not None else valid_rows_per_unit([mask], total, units)
    plans = []
    for worker in range(per_rank_units):
        unit = rank * per_rank_units + worker
        segments = _unit_segments(ranges, unit * per_unit, (unit + 1) * per_unit, cumulative)
        rows = np.concatenate([np.arange(s.start, s.stop) for s in segments]) if segments else np.zeros(0, np.int64)
        if valid is not None:
            rows = rows[mask[rows]]
        if shuffle:
            rows = _buffer_shuffle(rows, np.random.default_rng([seed, epoch, unit, 2]), shuffle_buffer)
        plans.append(UnitPlan(tuple(segments), rows.astype(np.int64), per_unit // batch_size, batch_size))
    return plans


def skipped_per_worker(start_batch: int, workers: int) -> list[int]:
    """How many of each worker's batches come before global batch `start_batch` (round-robin order)."""
    w = max(workers, 1)
    return [len(range(i, start_batch, w)) for i in range(w)]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def _emit(item_fn: ItemFn, sample: Sample, stored: Any, compact: bool) -> dict[str, Any] | None:
    return item_fn(sample, stored) if compact else item_fn(sample)


def iter_unit_batches(shards_dir: str | Path, plan: UnitPlan, skip: int, item_fn: ItemFn) -> Iterator[dict[str, Any]]:
    """Stream the unit's segments sequentially and emit its batches (from index `skip`) in plan order.

    Rows wait in `pending` as read (encoded fields + `item_fn.stored(row)`), at most about a shuffle buffer's
    worth, and are decoded when their turn in the emission order comes. A row that yields no item is replaced
    by the following rows of the stream. With `validity_known`, rows of skipped batches are not even read;
    otherwise they are made into items and dropped, since which of them failed decides where batch `skip`
    starts (a resume of online mode costs decoding the unit's rows before it).
    """
    size, known = plan.batch_size, bool(getattr(item_fn, "validity_known", False))
    stored_fn = getattr(item_fn, "stored", None)
    decode = getattr(item_fn, "decode", decode_fields)  # an item function may decode its own way (CachedViews)
    stream, need = plan.stream.tolist(), plan.n_batches * size
    emitted = start = skip * size if known else 0  # items made so far, skipped batches included
    wanted = set(stream[start:])
    pending: dict[int, tuple[str | None, dict[str, bytes] | None, Any]] = {}
    batch: list[dict[str, Any]] = []
    position = start
    for segment in plan.segments:
        for row, key, fields in iter_shard_fields(shards_dir, segment.shard, segment.start, segment.stop, wanted):
            if row not in wanted:
                continue
            pending[row] = (key, fields, stored_fn(row) if stored_fn is not None else None)
            while position < len(stream) and stream[position] in pending:
                next_row = stream[position]
                position += 1
                key_, fields_, stored = pending.pop(next_row)
                sample = decode(next_row, key_, fields_)
                item = _emit(item_fn, sample, stored, stored_fn is not None)
                if item is None:
                    continue
                if emitted < skip * size:  # a row of a skipped batch: only whether it made an item matters
                    emitted += 1
                    continue
                batch.append(item)
                emitted += 1
                if len(batch) == size:
                    yield collate(batch)
                    batch = []
                if emitted == need:
                    return
    raise UserError(f"a loader unit ran out of usable rows: {emitted - start} of the {need - start} it needs "
                    f"(its {len(stream)} rows hold undecodable images); repair or drop those images (make-shards), "
                    "or lower --batch-size")


class EpochStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker streams its own unit.

    The DataLoader always asks worker 0 first, so on a resume at global batch b, worker i serves unit
    (i + b) % W: the round-robin then continues exactly where the interrupted epoch stopped.
    """

    def __init__(self, shards_dir: str | Path, plans: list[UnitPlan], start_batch: int, item_fn: ItemFn) -> None:
        self.shards_dir, self.plans, self.item_fn = shards_dir, plans, item_fn  # a URL stays a string
        self.skips = skipped_per_worker(start_batch, len(plans))
        self.rotation = start_batch % len(plans)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        unit = ((0 if info is None else info.id) + self.rotation) % len(self.plans)
        return iter_unit_batches(self.shards_dir, self.plans[unit], self.skips[unit], self.item_fn)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 256 * 1024


def compact_worker_memory(_worker_id: int = 0) -> None:
    """worker_init_fn: allocations of 256 KiB and more (a buffered row's targets, a block, a batch) get pages of
    their own and return them to the OS when freed.

    glibc otherwise raises its mmap threshold after the first large free, so such rows come from the heap,
    and rows leaving the shuffle buffer in random order leave holes it cannot give back: a ViT-B worker grew
    from 0.69 to 0.96 GB between a 1k- and a 10k-row store that way (tec bench, worker_memory). Only in
    loader workers: a CPU training process allocating activations every step would pay for the mmaps.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        except (OSError, AttributeError):  # not glibc (e.g. musl): its allocator behaves differently anyway
            pass


def make_loader(dataset: IterableDataset, workers: int) -> DataLoader:
    """The one DataLoader set-up of the project: batches come collated from the workers."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=compact_worker_memory,
                      prefetch_factor=PREFETCH_BATCHES if workers else None, persistent_workers=False)


def stream_epoch(shards_dir: str | Path, item_fn: ItemFn, batch_size: int, seed: int, epoch: int,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                 limit: int | None = None, manifest: Manifest | None = None,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> Iterator[dict[str, Any]]:
    """The rank's batches of `epoch` from global batch `start_batch` on, as raw collated items."""
    manifest = manifest or load_manifest(shards_dir)
    known = getattr(item_fn, "known_valid", None)
    plans = plan_epoch(manifest, seed, epoch, batch_size, rank, world_size, workers, limit,
                       shuffle_buffer=shuffle_buffer, valid=known() if known is not None else None)
    yield from make_loader(EpochStream(shards_dir, plans, start_batch, item_fn), workers)


@dataclass(frozen=True)
class FreshViews:
    """Item function: a freshly sampled view (view id = epoch) of each image, as uint8 pixels."""

    img_size: int
    seed: int
    view_id: int

    def __call__(self, sample: Sample) -> dict[str, Any] | None:
        if sample.image is None:
            return None
        box = sample_view(self.seed, sample.row, self.view_id, *sample.image.size)
        return {"pixels": replay_view_uint8(sample.image, box, self.img_size), "rows": sample.row,
                "boxes": torch.from_numpy(box.as_array())}


def normalized(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """In the main process: uint8 `pixels` -> float32 normalised `images`, float16 entries -> float32 (both
    are what crosses from the workers, at half or a quarter of the bytes)."""
    for batch in batches:
        batch["images"] = normalize(batch.pop("pixels"))
        for key, value in batch.items():
            if value.dtype == torch.float16:
                batch[key] = value.float()
        yield batch


def fresh_view_batches(shards_dir: str | Path, img_size: int, batch_size: int, seed: int, epoch: int,
                       start_batch: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                       limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Training batches with fresh views (view id = epoch): {'images' [B,3,S,S] float32, 'rows', 'boxes'}."""
    item_fn = FreshViews(img_size, seed, epoch)
    return normalized(stream_epoch(shards_dir, item_fn, batch_size, seed, epoch, start_batch, rank, world_size,
                                   workers, limit))


def center_batches(shards_dir: str | Path, img_size: int, batch_size: int,
                   limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Evaluation batches in row order: {'images' (centre view), 'labels' (-1 if none), 'rows'}; undecodable skipped."""
    items = []
    for sample in iter_samples(shards_dir, 0, limit):
        if sample.image is None:
            continue
        label = -1 if sample.label is None else sample.label
        items.append({"pixels": center_view_uint8(sample.image, img_size), "labels": label, "rows": sample.row})
        if len(items) == batch_size:
            yield from normalized(iter([collate(items)]))
            items = []
    if items:
        yield from normalized(iter([collate(items)]))
