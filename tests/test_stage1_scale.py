"""Stage 1 at scale (issue 13): torchrun ranks, an external dask cluster, two writers on one store, precision,
content identity of the base model (issue 18) and one-line refusals. Every process started here is bounded in
time and stopped by its pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr

from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.store.integrity import check_integrity
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import SLOW_WRITER, assert_one_line_error, free_port, needs_fashion_mnist, tec_in_process

pytestmark = needs_fashion_mnist
ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ("features", "attention", "topk_index", "boxes", "valid", "done")
FLAGS = {"views": "2", "topk": "4", "chunk-rows": "64", "batch-size": "32", "codec": "fp32", "loader-workers": "0"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TEC_NO_PROGRESS": "1"}


def _argv(shards: Path | str, base: Path | str, out: Path | str, **extra: str) -> list[str]:
    flags = {**FLAGS, **extra}
    return ["cache-targets", "--shards", str(shards), "--base-model", str(base), "--out", str(out),
            *[x for k, v in flags.items() for x in (f"--{k}", v)]]


@pytest.fixture(scope="module")
def reference(fmnist_shards: Path, pico_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "reference.zarr"
    cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(out), views=2, topk=4,
                              chunk_rows=64, batch_size=32, codec="fp32", loader_workers=0))
    return out


def _assert_same_arrays(ours: Path, reference: Path) -> None:
    a, b = zarr.open_group(str(ours), mode="r"), zarr.open_group(str(reference), mode="r")
    for name in ARRAYS:
        assert np.array_equal(a[name][...], b[name][...]), name


@contextmanager
def _processes() -> Iterator[list[subprocess.Popen]]:
    """Processes started in their own session; each killed (its group, by pid) on the way out."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _start(procs: list[subprocess.Popen], argv: list[str], cwd: Path = ROOT, env: dict | None = None,
           ) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    procs.append(proc)
    return proc


def _torchrun(procs: list[subprocess.Popen], ranks: int, argv: list[str]) -> subprocess.Popen:
    return _start(procs, [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks),
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "cli.py", *argv])


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(reference: Path, fmnist_shards: Path, pico_base: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "ranks.zarr"
    with _processes() as procs:
        proc = _torchrun(procs, 2, _argv(fmnist_shards, pico_base, out))
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    summaries = [ln for ln in stdout.splitlines() if "tasks computed" in ln]
    assert summaries == [f"10 of 10 tasks computed (600 images, {summaries[0].split('images, ')[1]}"], stdout
    _assert_same_arrays(out, reference)


@pytest.mark.slow
def test_torchrun_resume_with_more_ranks_than_pending_groups(reference: Path, fmnist_shards: Path,
                                                             pico_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume.zarr"
    shutil.copytree(reference, out)
    done = zarr.open_group(str(out), mode="r+")["done"]
    done[0, 1], done[1, 1], done[1, 4] = False, False, False  # 2 chunk groups pending, 3 ranks
    with _processes() as procs:
        proc = _torchrun(procs, 3, _argv(fmnist_shards, pico_base, out))
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "3 of 10 tasks computed" in stdout
    _assert_same_arrays(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["second_joins_a_running_writer", "both_create_the_new_store"])
def test_two_writers_on_one_store(order: str, reference: Path, fmnist_shards: Path, pico_base: Path,
                                  tmp_path: Path) -> None:
    out = tmp_path / "shared.zarr"
    argv = _argv(fmnist_shards, pico_base, out)
    with _processes() as procs:
        first = _start(procs, [sys.executable, "-c", SLOW_WRITER, "0.4", *argv])
        if order == "second_joins_a_running_writer":
            deadline = time.time() + 120
            while time.time() < deadline and not (out / "done" / "zarr.json").exists():
                time.sleep(0.05)
            time.sleep(1.0)  # the first writer holds claims and is writing
        second = _start(procs, [sys.executable, "-c", SLOW_WRITER, "0.1", *argv])
        results = [p.communicate(timeout=300) for p in (first, second)]
    computed = 0
    for proc, (stdout, stderr) in zip((first, second), results, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr
        computed += int(next(ln for ln in stdout.splitlines() if "tasks computed" in ln).split()[0])
    assert computed == 10  # every task written by exactly one of the two writers
    store = TargetStore.open(out)
    assert store.done_mask().all() and not check_integrity(store)
    _assert_same_arrays(out, reference)
    assert not list(out.rglob("*.partial")) and not out.with_name("shared.zarr.claims").exists()


def test_cleanup_keeps_a_live_writers_partial_files(reference: Path, tmp_path: Path) -> None:
    from tec_pipeline.store.claims import ClaimBook
    from tec_pipeline.store.layout import Task

    out = tmp_path / "torn.zarr"
    shutil.copytree(reference, out)
    store = TargetStore.open(out)
    live, dead = Task(0, 1, 64, 128), Task(1, 2, 128, 192)
    book = ClaimBook(out)
    assert book.claim([live])
    stale = out.with_name("torn.zarr.claims") / "v1-t2"
    stale.write_text('{"host": "elsewhere", "pid": 1, "token": "x"}')
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # its heartbeat stopped an hour ago
    kept = out / "features" / "c" / "0" / "1" / "0" / "0.abc.partial"
    gone = out / "features" / "c" / "1" / "2" / "0" / "0.def.partial"
    for path in (kept, gone):
        path.write_bytes(b"half a chunk")
    TargetStore.create_or_resume(out, store.spec, {k: v for k, v in store.attrs.items()
                                                   if k not in ("format_version", "codec", "spec")})
    assert kept.exists() and not gone.exists()
    assert not book.claim([live]) or book.owns(live)  # still ours
    other = ClaimBook(out)
    assert not other.claim([live]) and other.claim([dead])  # live refused, stale taken over
    book.close()
    other.close()


@pytest.mark.slow
def test_dask_external_cluster_relative_paths_from_another_directory(
        reference: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path) -> None:
    dask = str(Path(sys.executable).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copytree(fmnist_shards, work / "shards")
    shutil.copy(pico_base, work / "base.pth")
    with _processes() as procs:
        _start(procs, [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"])
        for _ in range(2):
            _start(procs, [dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                           "--local-directory", str(tmp_path / "dask")], cwd=tmp_path)
        client = _start(procs, [sys.executable, str(ROOT / "cli.py"),
                                *_argv("shards", "base.pth", "store.zarr", scheduler=address)], cwd=work)
        _, stderr = client.communicate(timeout=300)
    assert client.returncode == 0, stderr[-3000:]
    _assert_same_arrays(work / "store.zarr", reference)


def test_scheduler_that_does_not_answer_fails_before_any_store(fmnist_shards: Path, pico_base: Path,
                                                               tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.zarr"
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, out, scheduler=address))
    assert_one_line_error(proc)
    assert address in proc.stderr and "did not answer" in proc.stderr
    assert not out.exists()
