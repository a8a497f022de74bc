"""Reliability (design §8, issue 10): faults injected into every stage, damaged data, and nothing lost.

The README's "Reliability" section lists each guarantee with the test that proves it, here or elsewhere
(SIGKILL + resume of stage 2, MAE resume, atomic checkpoint writes, checkpoint refusals at load level).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import cli
from tec_pipeline.data.loader import plan_epoch
from tec_pipeline.data.shards import iter_samples, load_manifest
from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.stage1.cluster import run_group
from tec_pipeline.store.layout import Task
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import SMALL_CACHE, assert_same_store, needs_fashion_mnist, run_tec, small_cache_argv

pytestmark = needs_fashion_mnist
TASKS, DATA_ARRAYS, META_OBJECTS = 10, 5, 7  # 2 views x 5 chunks of 300 rows; group + 6 arrays
KILL_SEED = 20240610
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# `tec ARGS`, SIGKILLed (its whole process group) at its N-th store write of one kind: 'meta' (a zarr.json:
# the store is being created), 'data' (a chunk of a task's targets), 'done' (a task's flag, after all of its
# data), or 'torn' (the N-th data chunk, half-way into Zarr's temporary file). Writes are what a kill can leave
# half done, so these are the points where a kill matters.
_KILL_DRIVER = """
import os, signal, sys
from zarr.storage import LocalStore
from zarr.storage._local import _atomic_write

kind, target = sys.argv[1], int(sys.argv[2])
seen = {"meta": 0, "data": 0, "done": 0, "torn": 0}
write = LocalStore._set

def die():
    os.killpg(os.getpgid(0), signal.SIGKILL)

async def write_or_die(self, key, value, *args, **kwargs):
    what = "meta" if key.endswith("zarr.json") else "done" if key.startswith("done/") else "data"
    if kind == "torn" and what == "data":
        what = "torn"  # counted as data writes; the kill lands inside the write
    seen[what] += 1
    if what == kind and seen[what] == target:
        if kind == "torn":
            (self.root / key).parent.mkdir(parents=True, exist_ok=True)
            with _atomic_write(self.root / key, "wb") as f:
                f.write(value.to_bytes()[: len(value) // 2])
                f.flush()
                die()
        die()
    return await write(self, key, value, *args, **kwargs)

LocalStore._set = write_or_die
import cli
cli.main(sys.argv[3:])
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run much faster on one thread on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)




@pytest.fixture()
def trained_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every batch `tec pretrain` trains on (in-process), in order."""
    from tec_pipeline.train import pretrain as stage

    rows: list[int] = []
    step = stage._Step.__call__

    def spy(self: object, model: torch.nn.Module, batch: dict) -> dict:
        rows.extend(batch["rows"].tolist())
        return step(self, model, batch)

    monkeypatch.setattr(stage._Step, "__call__", spy)
    return rows


def _planned_rows(shards: Path, batch_size: int, rows: int, valid: np.ndarray, epoch: int = 0,
                  seed: int = 0) -> set[int]:
    """Rows the loader plans for the epoch from the `valid` ones (a partial last batch is not planned)."""
    plan = plan_epoch(load_manifest(shards), seed, epoch, batch_size, limit=rows, valid=valid)[0]
    assert valid[plan.batches].all()
    return set(plan.batches.ravel().tolist())


@pytest.mark.slow
def test_cache_targets_sigkilled_at_three_random_points_then_rerun_is_identical(
        reference_store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.zarr"
    argv = small_cache_argv(fmnist_shards, pico_base, out)
    rng = np.random.default_rng(KILL_SEED)
    points = [("meta", int(rng.integers(1, META_OBJECTS + 1))),
              ("torn", int(rng.integers(1, TASKS * DATA_ARRAYS))), ("done", None)]
    for kind, n in points:
        if n is None:  # the last kill: at a random one of the flags still to be written
            n = int(rng.integers(1, len(TargetStore.open(out).pending_tasks()) + 1))
        proc = subprocess.run([sys.executable, "-c", _KILL_DRIVER, kind, str(n), *argv], capture_output=True,
                              text=True, start_new_session=True, timeout=300, env=CHILD_ENV)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {kind} write {n}:\n{proc.stderr[-2000:]}"
        if kind == "torn":
            assert list(out.rglob("*.partial")), "the torn write leaves Zarr's temporary file behind"
    store = TargetStore.open(out)
    written = store.keys_under("valid/")
    data_no_flag = [t for t in store.pending_tasks() if f"valid/c/{t.view}/{t.index}" in written]
    assert data_no_flag, "the last kill leaves a task whose data is written but whose done flag is not"
    cli.main(argv)
    assert_same_store(out, reference_store)


def _logged_group(cfg: CacheConfig, tasks: list[Task], storage_options: dict) -> int:
    """`run_group` on a dask worker, slowed and logged to tasks.log beside the store so a test can kill it."""
    log = Path(cfg.out).with_name("tasks.log")
    with open(log, "a") as f:
        f.write(f"start {tasks[0].index} {os.getpid()}\n")
    time.sleep(0.3)
    rows = run_group(cfg, tasks, storage_options)
    with open(log, "a") as f:
        f.write(f"end {tasks[0].index} {os.getpid()}\n")
    return rows


@pytest.mark.slow
def test_dask_worker_killed_mid_task_the_task_is_rerun_elsewhere(
        reference_store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tec_pipeline.stage1.cluster as cluster

    monkeypatch.setattr(cluster, "run_group", _logged_group)
    out, log = tmp_path / "dask.zarr", tmp_path / "tasks.log"
    killed: dict[str, str] = {}

    def kill_the_first_worker_to_start_a_task() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            lines = (log.read_text() if log.exists() else "").splitlines()
            started = [line.split() for line in lines if line.startswith("start ")]
            if started:
                _, index, pid = started[0]
                os.kill(int(pid), signal.SIGKILL)
                killed.update(task=index, pid=pid)
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_the_first_worker_to_start_a_task, daemon=True)
    watcher.start()
    summary = cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(out),
                                        **{**SMALL_CACHE, "workers": 2}))
    watcher.join()
    assert killed and summary["tasks_run"] == TASKS
    events = [line.split(" ", 1) for line in log.read_text().splitlines()]
    ends = [rest.rsplit(" ", 1) for what, rest in events if what == "end"]
    finished_by = [pid for task, pid in ends if task == killed["task"]]
    assert finished_by and killed["pid"] not in finished_by, (killed, events)
    assert_same_store(out, reference_store)


def test_undecodable_images_and_truncated_tar_are_skipped_counted_and_named(
        damaged_shards: tuple[Path, list[int]], pico_base: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], trained_rows: list[int]) -> None:
    shards, bad = damaged_shards
    store = tmp_path / "store.zarr"
    cli.main(["cache-targets", "--shards", str(shards), "--base-model", str(pico_base), "--out", str(store),
              "--views", "2", "--topk", "4", "--chunk-rows", "32", "--loader-workers", "0"])
    target_store = TargetStore.open(store)
    assert target_store.done_mask().all()
    assert [np.flatnonzero(~valid).tolist() for valid in target_store.valid_mask()] == [bad, bad]
    capsys.readouterr()
    cli.main(["inspect", str(store), "--json"])
    assert json.loads(capsys.readouterr().out)["invalid_rows"] == 2 * len(bad)
    cli.main(["verify", str(store), "--shards", str(shards)])
    named = capsys.readouterr().out.splitlines()[0]
    assert named.startswith("invalid (undecodable) rows: ")
    assert set(named.split(": ", 1)[1].split(", ")) == {f"view {v} row {r}" for v in (0, 1) for r in bad}
    cli.main(["pretrain", "--targets", str(store), "--shards", str(shards), "--out", str(tmp_path / "run"),
              "--epochs", "1", "--batch-size", "16", "--deterministic"])
    valid = np.ones(96, dtype=bool)
    valid[bad] = False
    # the bad rows are never read; every batch is full, of the valid rows that follow in the shuffled order
    assert len(trained_rows) == (96 - len(bad)) // 16 * 16 == len(set(trained_rows))
    assert set(trained_rows) == _planned_rows(shards, 16, 96, valid)


def test_allow_partial_trains_only_on_rows_of_finished_tasks(
        reference_store: Path, fmnist_shards: Path, tmp_path: Path, trained_rows: list[int]) -> None:
    partial = tmp_path / "partial.zarr"
    shutil.copytree(reference_store, partial)
    done = zarr.open_group(str(partial), mode="r+")["done"]
    done[0, 1] = False  # killed after all its data, before its flag
    done[0, 3] = False  # killed half-way through its data:
    for name in ("features", "attention"):
        shutil.rmtree(partial / name / "c" / "0" / "3")
    cli.main(["pretrain", "--targets", str(partial), "--shards", str(fmnist_shards), "--out",
              str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32", "--allow-partial",
              "--deterministic"])
    finished = np.array([row // 64 not in (1, 3) for row in range(300)])
    assert len(trained_rows) == len(set(trained_rows)) == finished.sum() // 32 * 32
    assert set(trained_rows) == _planned_rows(fmnist_shards, 32, 300, finished)


class _RunsCode:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("case", ["wrong keys", "wrong shapes", "code in the pickle"])
def test_cache_targets_refuses_a_bad_base_checkpoint_with_the_reason(
        case: str, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = torch.load(pico_base, weights_only=True)
    model, marker = dict(checkpoint["model"]), tmp_path / "code ran"
    if case == "wrong keys":
        model["blocks.0.attn.relative_position_bias"] = torch.zeros(3)
        del model["blocks.1.mlp.fc1.weight"]
        reasons = ["unexpected keys blocks.0.attn.relative_position_bias (3,)",
                   "missing keys blocks.1.mlp.fc1.weight"]
    elif case == "wrong shapes":
        model["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 48)  # (another patch grid is resampled, not refused)
        reasons = ["shape mismatch blocks.1.mlp.fc1.weight (100, 48) vs model (192, 48)"]
    else:
        model = _RunsCode(marker)
        reasons = ["refusing", "could run code"]
    torch.save({**checkpoint, "model": model}, tmp_path / "bad base.pth")
    out = tmp_path / "store.zarr"
    with pytest.raises(SystemExit) as info:
        cli.main(["cache-targets", "--shards", str(fmnist_shards), "--base-model",
                  str(tmp_path / "bad base.pth"), "--out", str(out), "--topk", "4"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("Error: ") and err.count("\n") == 1, err
    assert all(reason in err for reason in reasons), err
    assert not marker.exists() and not out.exists()


def test_non_finite_loss_stops_clearly_and_the_last_checkpoint_resumes(
        reference_store: Path, fmnist_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    latest = run / "checkpoint.pth"

    from tec_pipeline.train import pretrain as stage

    def pretrain() -> None:
        cli.main(["pretrain", "--targets", str(reference_store), "--shards", str(fmnist_shards), "--out",
                  str(run), "--limit", "128", "--batch-size", "32", "--epochs", "2", "--blr", "1e-3",
                  "--warmup-epochs", "0.5", "--deterministic"])

    step, calls = stage._Step.__call__, {"n": 0}

    def blows_up_in_epoch_1(self: object, model: torch.nn.Module, batch: dict) -> dict:
        calls["n"] += 1
        out = step(self, model, batch)
        return {**out, "loss": out["loss"] * float("inf")} if calls["n"] == 6 else out  # epoch 1, 2nd step

    monkeypatch.setattr(stage._Step, "__call__", blows_up_in_epoch_1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        pretrain()
    monkeypatch.undo()
    good = (run / "checkpoint-0.pth").read_bytes()  # the epoch-0 copy: what checkpoint.pth must still be
    assert torch.load(latest, weights_only=True)["data_position"] == {
        "epoch": 1, "batch": 0, "micro_batches_per_epoch": 4, "world_size": 1}
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "loss became" in err and f"last good checkpoint: {latest}" in err, err
    options = {opt for param in cli.tec.get_command(None, "pretrain").params for opt in param.opts}
    advised = {word.strip(",.") for word in err.split() if word.startswith("--")}
    assert advised <= options, err  # the advice names flags this command has
    assert latest.read_bytes() == good
    with caplog.at_level(logging.INFO, logger="tec_pipeline.train.loop"):
        pretrain()  # the same settings: it resumes from the last good checkpoint
    assert "resuming at epoch 1, micro-batch 0" in caplog.text
    final = torch.load(latest, weights_only=True)
    assert final["data_position"]["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in final["model"].values())
    losses = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(row[0]) for row in losses] == [4, 8]  # the default --log-every 10: one row per 4-step epoch
    assert all(np.isfinite(float(row[3])) for row in losses)


def test_paths_with_spaces_and_non_ascii_work_end_to_end(fmnist_shards: Path, pico_base: Path,
                                                        tmp_path: Path) -> None:
    root = tmp_path / "dätä dir ✓"
    folder = root / "imágenes"
    for sample in iter_samples(fmnist_shards, 0, 48):
        classdir = folder / ("clase ñ" if sample.label % 2 else "クラス 2")
        classdir.mkdir(parents=True, exist_ok=True)
        sample.image.save(classdir / f"imagen {sample.row} é.png")
    shards, store, run = root / "shärds 1", root / "störe ü.zarr", root / "rün 1"
    base, weights = root / "bäse modél.pth", root / "vït wéights.safetensors"
    result = root / "résultats ✓.json"
    shutil.copy(pico_base, base)
    # a real process for the first step: the paths also go through argv decoding
    run_tec("make-shards", f"imagefolder:{folder}", "--out", str(shards), "--shard-size", "16", check=True,
            env=CHILD_ENV)
    cli.main(["cache-targets", "--shards", str(shards), "--base-model", str(base), "--out", str(store),
              "--views", "1", "--topk", "4", "--chunk-rows", "16", "--loader-workers", "0"])
    cli.main(["pretrain", "--targets", str(store), "--shards", str(shards), "--out", str(run),
              "--epochs", "1", "--batch-size", "16"])
    cli.main(["convert", str(run / "checkpoint.pth"), "--out", str(weights)])
    cli.main(["knn", "--checkpoint", str(weights), "--train-shards", str(shards), "--test-shards",
              str(shards), "--k", "5", "--json", str(result)])
    record = json.loads(result.read_text(encoding="utf-8"))
    assert record["n_train"] == record["n_test"] == 48 and record["top1"] > 0
