"""`tec cache-targets --repair` (issue 18): exactly the damaged tasks are recomputed, the others are not touched,
and the repaired store equals an undamaged one array by array."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tec_pipeline.store.integrity import check_integrity, damaged_tasks
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import assert_one_line_error, needs_fashion_mnist, small_cache_argv, tec_in_process

pytestmark = needs_fashion_mnist



def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _damage(store: Path) -> set[str]:
    """Three kinds of damage in three tasks; returns the chunk-file prefixes of the damaged tasks."""
    chunk = store / "features" / "c" / "0" / "2" / "0" / "0"  # view 0 task 2: a flipped byte (checksum fails)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (store / "topk_index" / "c" / "1" / "3" / "0").unlink()  # view 1 task 3: a lost chunk
    (store / "done" / "c" / "1" / "4").write_bytes(b"garbage")  # view 1 task 4: an unreadable done flag
    return {"0/2", "1/3", "1/4"}


def _task_of(relative: str) -> str | None:
    parts = relative.split("/")
    return "/".join(parts[2:4]) if len(parts) >= 4 and parts[1] == "c" else None


def test_repair_recomputes_exactly_the_damaged_tasks(reference_store: Path, fmnist_shards: Path, pico_base: Path,
                                                     tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "damaged.zarr"
    shutil.copytree(reference_store, store)
    damaged = _damage(store)
    assert [(t.view, t.index) for t in damaged_tasks(TargetStore.open(store))] == [(0, 2), (1, 3), (1, 4)]
    before = _files(store)
    argv = small_cache_argv(fmnist_shards, pico_base, store)
    plain = tec_in_process(capfd, *argv)  # a plain rerun: no checksum traceback, the advice to repair
    assert_one_line_error(plain)
    assert "done flag of view 1 task 4 does not decode (ValueError); rerun with --repair" in plain.stderr
    assert _files(store) == before
    verify = ["verify", str(store), "--shards", str(fmnist_shards)]
    found = tec_in_process(capfd, *verify)
    assert found.returncode == 1 and "FAIL: features: chunk of view 0 task 2 (rows 128-192) does not decode" in found.stderr
    assert "FIX: rerun the store's `tec cache-targets` command with --repair" in found.stderr, found.stderr
    proc = tec_in_process(capfd, *argv, "--repair")
    assert proc.returncode == 0, proc.stderr
    assert "repair: 3 damaged task(s) to recompute: view 0 task 2, view 1 task 3, view 1 task 4" in proc.stdout
    assert "3 of 10 tasks computed" in proc.stdout, proc.stdout
    after = _files(store)
    untouched = [name for name in before if _task_of(name) not in damaged]
    assert untouched and all(after[name] == before[name] for name in untouched), "another task's file changed"
    assert set(after) == set(_files(reference_store))
    ours, reference = zarr.open_group(str(store), mode="r"), zarr.open_group(str(reference_store), mode="r")
    assert dict(ours.attrs) == dict(reference.attrs)
    for name in reference.array_keys():
        assert np.array_equal(ours[name][...], reference[name][...]), name
    assert check_integrity(TargetStore.open(store)) == []
    assert tec_in_process(capfd, *verify).returncode == 0
    again = tec_in_process(capfd, *argv, "--repair")
    assert "repair: 0 damaged task(s) to recompute" in again.stdout and "0 of 10 tasks computed" in again.stdout
