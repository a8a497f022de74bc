"""Stage 1's decode ring (stage1/ring.py): the inputs decode_tasks gives, slots reused, rows handed over only
when final, workers that fail or lose their parent, and the store it feeds equal to one decoded in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tec_pipeline.data.shards import load_manifest
from tec_pipeline.errors import UserError
from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.stage1.decode import decode_rows_into, decode_tasks, decode_tasks_in_background
from tec_pipeline.stage1.ring import DecodeJob, DecodeRing, WorkerFailed
from tec_pipeline.store.layout import Task
from tests.conftest import assert_same_store

SIZE = 16


def _groups(rows: int, chunk: int, views: int = 2) -> list[list[Task]]:
    """One group per chunk, all views; the last chunk is ragged when chunk does not divide rows."""
    return [[Task(v, i, start, min(start + chunk, rows)) for v in range(views)]
            for i, start in enumerate(range(0, rows, chunk))]


def _job(shards: Path, groups: list[list[Task]], replay: str = "pil", every: int = 8) -> DecodeJob:
    return DecodeJob(str(shards), load_manifest(shards), groups, 3, SIZE, replay, every)


@pytest.mark.parametrize("replay", ["pil", "torch"])
def test_ring_gives_decode_tasks_inputs_with_slots_reused(damaged_shards: tuple[Path, list[int]], replay: str) -> None:
    shards, bad = damaged_shards
    rows = load_manifest(shards).total_rows
    groups = _groups(rows, 20)  # 5 groups, the last one ragged, more than the 3 slots of one worker
    groups[3] = groups[3][1:]  # a group of one view only (view 0 of that chunk is already done)
    job = _job(shards, groups, replay)
    seen, invalid_rows = [], 0
    with DecodeRing(job, workers=1, pin=False, admit=lambda i: i != 1) as ring:  # group 1 is held elsewhere
        for group in ring:
            tasks = [inputs.task for inputs in group]
            seen.append(tasks)
            expected = decode_tasks(job.shards, job.manifest, tasks, job.seed, SIZE, replay)
            for got, want in zip(group, expected, strict=True):
                got.wait_rows(len(got.pixels))
                assert torch.equal(got.pixels, want.pixels)
                assert np.array_equal(got.boxes, want.boxes) and np.array_equal(got.valid, want.valid)
                invalid_rows += int((~got.valid).sum())
    assert seen == [g for i, g in enumerate(groups) if i != 1]
    assert invalid_rows > 0 and bad  # damaged rows were among them


def test_rows_are_handed_over_only_when_final_into_dirty_buffers(fmnist_shards: Path) -> None:
    tasks = [Task(0, 0, 0, 44), Task(1, 0, 0, 44)]
    manifest = load_manifest(fmnist_shards)
    want = decode_tasks(str(fmnist_shards), manifest, tasks, 3, SIZE)
    pixels = torch.full((2, 44, 3, SIZE, SIZE), 7, dtype=torch.uint8)  # a slot holding an earlier group
    boxes, valid = np.full((2, 44, 5), 9, dtype=np.int32), np.ones(44, dtype=bool)
    reports = []

    def on_rows(done: int) -> None:
        reports.append(done)
        for j in range(2):
            assert torch.equal(pixels[j, :done], want[j].pixels[:done])
            assert np.array_equal(boxes[j, :done], want[j].boxes[:done])

    decode_rows_into(pixels, boxes, valid, str(fmnist_shards), manifest, tasks, 3, "pil", on_rows, every=16)
    assert reports == [16, 32, 44]
    assert all(torch.equal(pixels[j], want[j].pixels) for j in range(2)) and np.array_equal(valid, want[0].valid)


def test_undecodable_rows_blank_a_reused_buffer(damaged_shards: tuple[Path, list[int]]) -> None:
    shards, bad = damaged_shards
    manifest = load_manifest(shards)
    tasks = [Task(0, 0, 0, manifest.total_rows)]
    pixels = torch.full((1, manifest.total_rows, 3, SIZE, SIZE), 7, dtype=torch.uint8)
    boxes, valid = np.full((1, manifest.total_rows, 5), 9, dtype=np.int32), np.ones(manifest.total_rows, dtype=bool)
    decode_rows_into(pixels, boxes, valid, str(shards), manifest, tasks, 3)
    assert np.flatnonzero(~valid).tolist() == bad
    assert not pixels[0, bad].any() and not boxes[0, bad].any()
    assert torch.equal(pixels, decode_tasks(str(shards), manifest, tasks, 3, SIZE)[0].pixels[None])


def test_background_decode_gives_decode_tasks_inputs_and_its_error(damaged_shards: tuple[Path, list[int]],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shards, _ = damaged_shards
    manifest = load_manifest(shards)
    tasks = [Task(0, 0, 0, manifest.total_rows), Task(1, 0, 0, manifest.total_rows)]
    want = decode_tasks(str(shards), manifest, tasks, 3, SIZE, "torch")
    got = decode_tasks_in_background(str(shards), manifest, tasks, 3, SIZE, "torch", every=8)
    got[1].wait_rows(manifest.total_rows)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.pixels, b.pixels) and np.array_equal(a.boxes, b.boxes)
        assert np.array_equal(a.valid, b.valid)
    import tec_pipeline.stage1.decode as decode

    real = decode.decode_for_replay

    def failing(row: int, *args: object) -> object:
        if row == 20:
            raise UserError("row 20: the storage went away")
        return real(row, *args)

    monkeypatch.setattr(decode, "decode_for_replay", failing)
    got = decode_tasks_in_background(str(shards), manifest, tasks, 3, SIZE, every=8)
    got[0].wait_rows(16)  # rows before the failure are there
    with pytest.raises(UserError, match="row 20: the storage went away"):
        got[0].wait_rows(24)


def test_killed_worker_is_reported_not_waited_for(fmnist_shards: Path) -> None:
    with DecodeRing(_job(fmnist_shards, _groups(300, 64)), workers=1, pin=False) as ring:
        for pid in ring.worker_pids:
            os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerFailed, match=r"decode worker .* exited unexpectedly with code -9"):
            for group in ring:
                group[0].wait_rows(len(group[0].pixels))
        assert time.monotonic() - started < 30


def test_worker_error_reaches_the_caller(fmnist_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tec_pipeline.stage1.decode as decode

    real = decode.decode_for_replay

    def failing(row: int, *args: object) -> object:
        if row == 130:
            raise UserError("row 130: the storage went away")
        return real(row, *args)

    monkeypatch.setattr(decode, "decode_for_replay", failing)  # the forked workers inherit it
    with DecodeRing(_job(fmnist_shards, _groups(300, 64)), workers=2, pin=False) as ring, \
            pytest.raises(UserError, match="row 130: the storage went away"):
        for group in ring:
            group[0].wait_rows(len(group[0].pixels))


_ORPHAN = """
import sys, time
from pathlib import Path
from tec_pipeline.data.shards import load_manifest
from tec_pipeline.errors import UserError
from tec_pipeline.stage1.ring import DecodeJob, DecodeRing
from tec_pipeline.store.layout import Task
shards = Path(sys.argv[1])
ring = DecodeRing(DecodeJob(str(shards), load_manifest(shards), [[Task(0, 0, 0, 64)]], 0, 16, "pil", 8), 1, False)
print(*ring.worker_pids, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def test_workers_exit_when_the_main_process_is_killed(fmnist_shards: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(fmnist_shards)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_running(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = [p for p in pids if _running(p)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover


def test_two_decode_workers_give_the_in_process_store(damaged_shards: tuple[Path, list[int]], pico_base: Path,
                                                      tmp_path: Path) -> None:
    shards, _ = damaged_shards

    def run(out: Path, workers: int) -> Path:
        # batches of 8 within chunks of 24: groups are handed over piece by piece, 5 groups through 5 slots
        cache_targets(CacheConfig(shards=str(shards), base_model=str(pico_base), out=str(out), views=2, topk=4,
                                  chunk_rows=24, batch_size=8, codec="fp16", loader_workers=workers))
        return out

    assert_same_store(run(tmp_path / "ring.zarr", 2), run(tmp_path / "inline.zarr", 0))
