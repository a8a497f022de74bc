"""The streaming loader: equal steps per rank, each row at most once per epoch, full batches, exact resume,
bounded compact buffers, one set of workers for a whole run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tec_pipeline.data.loader import (
    FreshViews,
    center_batches,
    fresh_view_batches,
    make_loader,
    normalized,
    plan_epoch,
    steps_per_epoch,
    stream_epoch,
    valid_rows_per_unit,
)
from tec_pipeline.data.shards import Sample, load_manifest
from tec_pipeline.errors import UserError
from tests.conftest import needs_fashion_mnist


@needs_fashion_mnist
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reproduces_remaining_batches(fmnist_shards: Path, workers: int) -> None:
    full = list(fresh_view_batches(fmnist_shards, 28, 16, seed=1, epoch=3, workers=workers))
    assert len(full) == steps_per_epoch(fmnist_shards, 16, workers=workers)
    for start in (1, 5):
        rest = list(fresh_view_batches(fmnist_shards, 28, 16, seed=1, epoch=3, start_batch=start, workers=workers))
        assert len(rest) == len(full) - start
        for a, b in zip(full[start:], rest, strict=True):
            assert np.array_equal(a["rows"], b["rows"]) and np.array_equal(a["images"], b["images"])


@needs_fashion_mnist
def test_ranks_get_equal_steps_and_disjoint_rows(fmnist_shards: Path) -> None:
    manifest = load_manifest(fmnist_shards)
    seen = []
    for rank in range(3):
        plans = plan_epoch(manifest, seed=0, epoch=0, batch_size=8, rank=rank, world_size=3, workers=2)
        assert [p.batches.shape for p in plans] == [plans[0].batches.shape] * 2
        seen.extend(np.concatenate([p.batches.ravel() for p in plans]).tolist())
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(300))
    assert len(seen) > 250  # only the remainder of the equal split is dropped


@needs_fashion_mnist
def test_epochs_shuffle_differently_and_views_change(fmnist_shards: Path) -> None:
    e0 = next(iter(fresh_view_batches(fmnist_shards, 28, 300, seed=0, epoch=0)))
    e1 = next(iter(fresh_view_batches(fmnist_shards, 28, 300, seed=0, epoch=1)))
    assert not np.array_equal(e0["rows"], e1["rows"])
    assert sorted(e0["rows"].tolist()) == sorted(e1["rows"].tolist())
    order = np.argsort(e1["rows"].numpy())
    assert not np.array_equal(e0["boxes"][np.argsort(e0["rows"].numpy())], e1["boxes"][order])


@needs_fashion_mnist
def test_center_batches_in_row_order_with_labels(fmnist_shards: Path) -> None:
    batches = list(center_batches(fmnist_shards, 28, 128))
    rows = np.concatenate([b["rows"] for b in batches])
    assert rows.tolist() == list(range(300))
    assert all(b["labels"].min() >= 0 for b in batches)
    again = list(center_batches(fmnist_shards, 28, 128))
    assert all(np.array_equal(a["images"], b["images"]) for a, b in zip(batches, again, strict=True))


@dataclass(frozen=True)
class DropRows(FreshViews):
    """FreshViews that finds some rows unusable only when it decodes them (as an undecodable image)."""

    dropped: frozenset[int] = frozenset()

    def __call__(self, sample: Sample) -> dict | None:
        return None if sample.row in self.dropped else super().__call__(sample)


@needs_fashion_mnist
@pytest.mark.parametrize("workers", [0, 2])
def test_unusable_rows_are_replaced_by_the_following_rows_and_resume_stays_exact(
        fmnist_shards: Path, workers: int) -> None:
    plan = plan_epoch(load_manifest(fmnist_shards), 1, 0, 16, workers=workers)
    dropped = frozenset(int(r) for p in plan for r in p.stream[3:6])  # a few rows of every unit's first batch
    item_fn = DropRows(28, seed=1, view_id=0, dropped=dropped)
    full = list(normalized(stream_epoch(fmnist_shards, item_fn, 16, seed=1, epoch=0, workers=workers)))
    assert len(full) == steps_per_epoch(fmnist_shards, 16, workers=workers)
    assert all(len(b["rows"]) == 16 for b in full)  # never short, never empty
    for unit, p in enumerate(plan):
        expected = [r for r in p.stream.tolist() if r not in dropped][: p.n_batches * 16]
        got = np.concatenate([b["rows"] for b in full[unit::max(workers, 1)]]).tolist()
        assert got == expected  # the rows that follow in the unit's order fill in
    for start in (1, 3):
        rest = list(normalized(stream_epoch(fmnist_shards, item_fn, 16, seed=1, epoch=0, start_batch=start,
                                            workers=workers)))
        for a, b in zip(full[start:], rest, strict=True):
            assert torch.equal(a["rows"], b["rows"]) and torch.equal(a["images"], b["images"])


@needs_fashion_mnist
def test_a_unit_out_of_usable_rows_fails_instead_of_hanging(fmnist_shards: Path) -> None:
    item_fn = DropRows(28, seed=0, view_id=0, dropped=frozenset(range(0, 300, 2)))
    with pytest.raises(UserError, match="ran out of usable rows"):
        list(stream_epoch(fmnist_shards, item_fn, 16, seed=0, epoch=0))


@needs_fashion_mnist
def test_pieces_cut_by_valid_rows_give_every_unit_full_batches(fmnist_shards: Path) -> None:
    manifest = load_manifest(fmnist_shards)
    valid = np.ones(300, dtype=bool)
    valid[100:228] = False  # one contiguous hole, as an interrupted in-process stage 1 leaves
    per_unit = valid_rows_per_unit([valid], 300, 4)
    assert per_unit == 172 // 4
    seen = []
    for rank in range(2):
        for p in plan_epoch(manifest, 0, 0, 8, rank, 2, workers=2, valid=valid, valid_per_unit=per_unit):
            assert len(p.stream) == per_unit and valid[p.stream].all() and p.n_batches == per_unit // 8
            seen += p.stream.tolist()
    assert len(seen) == len(set(seen)) == 4 * per_unit
    assert steps_per_epoch(fmnist_shards, 8, 2, 2, valid_per_unit=per_unit) == 2 * (per_unit // 8)
    with pytest.raises(UserError, match=r"gets 43 valid rows and needs at least 64 .* 256 valid rows"):
        steps_per_epoch(fmnist_shards, 64, 2, 2, valid_per_unit=per_unit)


class CountingItems(FreshViews):
    """Counts rows held in compact form (read, `stored`, not yet emitted): the shuffle buffer's occupancy."""

    held = 0
    most = 0

    def stored(self, row: int) -> int:
        type(self).held += 1
        type(self).most = max(type(self).most, type(self).held)
        return row

    def __call__(self, sample: Sample, stored: int) -> dict | None:
        assert stored == sample.row
        type(self).held -= 1
        return super().__call__(sample)


@needs_fashion_mnist
def test_rows_wait_in_compact_form_at_most_a_shuffle_buffer(fmnist_shards: Path) -> None:
    for buffer in (20, 100):
        CountingItems.held = CountingItems.most = 0
        batches = list(stream_epoch(fmnist_shards, CountingItems(28, 0, 0), 10, 0, 0, shuffle_buffer=buffer))
        assert len(batches) == 30 and CountingItems.held == 0
        assert buffer <= CountingItems.most <= buffer + 1


@needs_fashion_mnist
@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_stream_every_epoch_from_one_loader(fmnist_shards: Path, workers: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tec_pipeline.stage2 import epochs

    made = []
    monkeypatch.setattr(epochs, "make_loader", lambda *a: made.append(a) or make_loader(*a))
    manifest = load_manifest(fmnist_shards)
    spec = epochs.StreamSpec(str(fmnist_shards), manifest, epochs.EpochItems(28, view_seed=5), 16, seed=2, epochs=3,
                             workers=workers, limit=160)
    steps = steps_per_epoch(fmnist_shards, 16, workers=workers, limit=160)
    source = epochs.TrainingBatches(spec, steps)
    try:
        run = [list(source(e, 0)) for e in range(3)]
        assert len(made) == 1  # the workers lived through all three epochs
        for e in range(3):
            per_epoch = list(normalized(stream_epoch(fmnist_shards, FreshViews(28, 5, e), 16, 2, e,
                                                     workers=workers, limit=160)))
            assert all(torch.equal(a["images"], b["images"]) for a, b in zip(run[e], per_epoch, strict=True))
        resumed = list(source(1, 3)) + list(source(2, 0))  # a resume restarts the stream at its position
        assert len(made) == 2
        assert all(torch.equal(a["rows"], b["rows"]) for a, b in zip(run[1][3:] + run[2], resumed, strict=True))
    finally:
        source.close()
