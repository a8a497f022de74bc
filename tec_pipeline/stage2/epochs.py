"""Stage-2 batches over a whole run from one set of loader workers: no refill at each epoch start.

`TrainingBatches` is the `batches(epoch, start_batch)` callable of `train.loop.run_training`. It starts one
DataLoader whose workers stream every remaining epoch back to back (`RunStream`), so at an epoch boundary the
workers are already reading, and their shuffle buffers filling, for the next epoch while the last batches of
this one are trained on. A call that does not continue where the previous one stopped (a resume) starts a
fresh stream at that position.

The DataLoader's round-robin stays aligned across epochs because every epoch has W × n batches (W workers of
n batches each): global batch g of any epoch comes from worker (g + r) % W, r fixed by the resume position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from tec_pipeline.data.loader import (
    DEFAULT_SHUFFLE_BUFFER,
    FreshViews,
    ItemFn,
    iter_unit_batches,
    make_loader,
    normalized,
    plan_epoch,
    skipped_per_worker,
)
from tec_pipeline.data.shards import Manifest
from tec_pipeline.stage2.cached import CachedViews, known_valid_rows
from tec_pipeline.store.target_store import TargetStore

VIEW_POLICIES = ("cycle", "first")


@dataclass(frozen=True)
class EpochItems:
    """What each epoch's rows become: the stored view (cached, `store` set) or a fresh one (online).

    Cached: view = epoch mod `views` ('cycle') or 0 ('first'); online: view id = epoch, drawn with `view_seed`.
    """

    img_size: int
    view_seed: int
    store: str | None = None
    views: int = 1
    view_policy: str = "cycle"

    def view(self, epoch: int) -> int:
        return epoch % self.views if self.view_policy == "cycle" else 0

    def item_fn(self, epoch: int) -> ItemFn:
        if self.store is None:
            return FreshViews(self.img_size, self.view_seed, epoch)
        return CachedViews(self.store, self.view(epoch), self.img_size)

    def views_used(self, epochs: int) -> list[int]:
        return sorted({self.view(e) for e in range(epochs)})


def valid_masks(items: EpochItems, epochs: int) -> dict[int, np.ndarray] | None:
    """bool [N] per view used (cached mode), None online (every row is expected to decode)."""
    if items.store is None:
        return None
    store = TargetStore.open(items.store)
    return {v: known_valid_rows(store, v) for v in items.views_used(epochs)}


@dataclass(frozen=True)
class StreamSpec:
    """The loader settings of one run (all ranks alike but `rank`)."""

    shards: str
    manifest: Manifest
    items: EpochItems
    batch_size: int
    seed: int
    epochs: int
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    limit: int | None = None
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    valid_per_unit: int | None = None  # cached mode: every unit's valid rows per epoch


class RunStream(IterableDataset):
    """Every epoch from (first_epoch, start_batch) to the end; each DataLoader worker streams its unit."""

    def __init__(self, spec: StreamSpec, first_epoch: int, start_batch: int) -> None:
        self.spec, self.first_epoch, self.start_batch = spec, first_epoch, start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        w = max(spec.workers, 1)
        info = get_worker_info()
        unit = ((0 if info is None else info.id) + self.start_batch) % w
        skip = skipped_per_worker(self.start_batch, w)[unit]
        for epoch in range(self.first_epoch, spec.epochs):
            item_fn = spec.items.item_fn(epoch)
            known = getattr(item_fn, "known_valid", None)
            plan = plan_epoch(spec.manifest, spec.seed, epoch, spec.batch_size, spec.rank, spec.world_size,
                              spec.workers, spec.limit, shuffle_buffer=spec.shuffle_buffer,
                              valid=known() if known is not None else None,
                              valid_per_unit=spec.valid_per_unit)[unit]
            yield from iter_unit_batches(spec.shards, plan, skip if epoch == self.first_epoch else 0, item_fn)


class TrainingBatches:
    """`batches(epoch, start_batch)` for the training loop, backed by one long-lived DataLoader iterator.

    `steps` micro-batches per epoch. Call `close()` when training ends (it stops the workers).
    """

    def __init__(self, spec: StreamSpec, steps: int) -> None:
        self.spec, self.steps = spec, steps
        self._it: Iterator[dict[str, Any]] | None = None
        self._next: tuple[int, int] | None = None  # the position the stream stands at

    def __call__(self, epoch: int, start_batch: int) -> Iterator[dict[str, Any]]:
        if self._next != (epoch, start_batch):
            self.close()
            self._it = normalized(iter(make_loader(RunStream(self.spec, epoch, start_batch), self.spec.workers)))
            self._next = (epoch, start_batch)
        return self._take(epoch, start_batch)

    def _take(self, epoch: int, start_batch: int) -> Iterator[dict[str, Any]]:
        assert self._it is not None
        for batch in range(start_batch, self.steps):
            self._next = None  # mid-batch: only a completed draw tells where the stream stands
            item = next(self._it)
            self._next = (epoch + 1, 0) if batch + 1 == self.steps else (epoch, batch + 1)
            yield item

    def close(self) -> None:
        """Shut the workers down (the DataLoader iterator's own shutdown), e.g. after an interrupted epoch."""
        it, self._it, self._next = self._it, None, None
        close = getattr(it, "close", None)
        if callable(close):
            close()
