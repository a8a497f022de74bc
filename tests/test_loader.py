"""The streaming loader: equal steps per rank, each row at most once per epoch, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tec_pipeline.data.loader import center_batches, fresh_view_batches, plan_epoch, steps_per_epoch
from tec_pipeline.data.shards import load_manifest
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
