"""Streaming loader for training and evaluation: design §4 (stage 2), shared by MAE, TEC cached and online.

Per epoch the shard order is permuted with (seed, epoch); the concatenated row stream is cut into equal
contiguous pieces, one per (rank, loader worker) *unit*, so shards are still read sequentially (and a store's
target rows in contiguous slices) while every rank gets the same number of samples even when shards are fewer
than units. Each unit shuffles its rows through a seeded shuffle buffer and batches them.

The order of every batch is computed up front from row ids alone, so resuming at batch b reproduces the rest of
the epoch exactly (decoding only what is still needed), and the DataLoader's round-robin over workers is
deterministic: global batch g of a rank comes from worker g % W. Resume with the same --workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tec_pipeline.data.shards import Manifest, Sample, ShardInfo, iter_samples, iter_shard_rows, load_manifest
from tec_pipeline.data.views import center_view_uint8, normalize, replay_view_uint8, sample_view
from tec_pipeline.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_SHUFFLE_BUFFER = 2000

# An item function turns a decoded sample into a dict of tensors, or None to drop it (undecodable, invalid row).
ItemFn = Callable[[Sample], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) (global row ids) of one shard."""

    shard: ShardInfo
    start: int
    stop: int


@dataclass(frozen=True)
class UnitPlan:
    segments: tuple[Segment, ...]
    batches: np.ndarray  # [n_batches, batch_size] row ids, in the order they are emitted


def _rows_used(manifest: Manifest, limit: int | None) -> int:
    return manifest.total_rows if limit is None else min(limit, manifest.total_rows)


def batches_per_unit(total_rows: int, batch_size: int, units: int) -> int:
    return (total_rows // units) // batch_size


def steps_per_epoch(shards_dir: str | Path, batch_size: int, world_size: int = 1, workers: int = 0,
                    limit: int | None = None, manifest: Manifest | None = None) -> int:
    """Batches every rank runs per epoch (identical on all ranks)."""
    manifest = manifest or load_manifest(shards_dir)
    per_rank_units = max(workers, 1)
    total = _rows_used(manifest, limit)
    steps = per_rank_units * batches_per_unit(total, batch_size, world_size * per_rank_units)
    if steps == 0:
        raise UserError(f"{total} images are too few for batch size {batch_size} on {world_size} rank(s) x "
                        f"{per_rank_units} loader worker(s); lower --batch-size or --workers")
    return steps


def _unit_segments(manifest: Manifest, order: np.ndarray, unit: int, per_unit: int, total: int) -> list[Segment]:
    """The unit's contiguous piece [unit*per_unit, (unit+1)*per_unit) of the permuted row stream."""
    lo, hi = unit * per_unit, (unit + 1) * per_unit
    segments, offset = [], 0
    for index in order:
        shard = manifest.shards[int(index)]
        start, stop = shard.first_row, min(shard.first_row + shard.count, total)
        n = max(stop - start, 0)
        a, b = max(lo - offset, 0), min(hi - offset, n)
        if a < b:
            segments.append(Segment(shard, start + a, start + b))
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
               shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> list[UnitPlan]:
    """One UnitPlan per loader worker of `rank` (one when workers == 0)."""
    per_rank_units = max(workers, 1)
    units = world_size * per_rank_units
    total = _rows_used(manifest, limit)
    per_unit = total // units
    n_batches = per_unit // batch_size
    order = (np.random.default_rng([seed, epoch, 1]).permutation(len(manifest.shards)) if shuffle
             else np.arange(len(manifest.shards)))
    plans = []
    for worker in range(per_rank_units):
        unit = rank * per_rank_units + worker
        segments = _unit_segments(manifest, order, unit, per_unit, total)
        rows = np.concatenate([np.arange(s.start, s.stop) for s in segments]) if segments else np.zeros(0, int)
        if shuffle:
            rows = _buffer_shuffle(rows, np.random.default_rng([seed, epoch, unit, 2]), shuffle_buffer)
        plans.append(UnitPlan(tuple(segments), rows[: n_batches * batch_size].reshape(n_batches, batch_size)))
    return plans


def skipped_per_worker(start_batch: int, workers: int) -> list[int]:
    """How many of each worker's batches come before global batch `start_batch` (round-robin order)."""
    w = max(workers, 1)
    return [len(range(i, start_batch, w)) for i in range(w)]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def iter_unit_batches(shards_dir: Path, plan: UnitPlan, skip: int, item_fn: ItemFn) -> Iterator[dict[str, Any]]:
    """Stream the unit's segments sequentially and emit its batches (from index `skip`) in plan order.

    A batch may hold fewer rows than planned when some items are dropped, so every rank still runs the same
    number of steps. Rows of skipped batches are not decoded.
    """
    needed = plan.batches[skip:]
    batch_of = {int(r): j for j, batch in enumerate(needed) for r in batch}
    remaining = [len(b) for b in needed]
    ready: dict[int, dict[str, Any] | None] = {}
    next_batch = 0
    for segment in plan.segments:
        for sample in iter_shard_rows(shards_dir, segment.shard, segment.start, segment.stop, set(batch_of)):
            j = batch_of.get(sample.row)
            if j is None:
                continue
            ready[sample.row] = item_fn(sample)
            remaining[j] -= 1
            while next_batch < len(needed) and remaining[next_batch] == 0:
                items = [ready.pop(int(r)) for r in needed[next_batch]]
                kept = [it for it in items if it is not None]
                if kept:
                    yield collate(kept)
                else:
                    log.warning("a whole batch was undecodable; yielding nothing for it")
                next_batch += 1


class EpochStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker streams its own unit.

    The DataLoader always asks worker 0 first, so on a resume at global batch b, worker i serves unit
    (i + b) % W: the round-robin then continues exactly where the interrupted epoch stopped.
    """

    def __init__(self, shards_dir: str | Path, plans: list[UnitPlan], start_batch: int, item_fn: ItemFn) -> None:
        self.shards_dir, self.plans, self.item_fn = Path(shards_dir), plans, item_fn
        self.skips = skipped_per_worker(start_batch, len(plans))
        self.rotation = start_batch % len(plans)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        unit = ((0 if info is None else info.id) + self.rotation) % len(self.plans)
        return iter_unit_batches(self.shards_dir, self.plans[unit], self.skips[unit], self.item_fn)


def stream_epoch(shards_dir: str | Path, item_fn: ItemFn, batch_size: int, seed: int, epoch: int,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                 limit: int | None = None, manifest: Manifest | None = None) -> Iterator[dict[str, Any]]:
    """The rank's batches of `epoch` from global batch `start_batch` on, as raw collated items."""
    manifest = manifest or load_manifest(shards_dir)
    plans = plan_epoch(manifest, seed, epoch, batch_size, rank, world_size, workers, limit)
    dataset = EpochStream(shards_dir, plans, start_batch, item_fn)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    yield from loader


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
    """uint8 `pixels` (cheap to pass between processes) -> float32 normalised `images`, in the main process."""
    for batch in batches:
        batch["images"] = normalize(batch.pop("pixels"))
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
