"""Every failure is one line with nothing lost (issue 18): a read-only output, a full disk, a damaged chunk met
during training. Faults are injected in-process (no root tricks): the write probe or the write itself raises
the OSError the operating system would."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

import tec_pipeline.outputs as outputs
from tec_pipeline.errors import UserError
from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import (
    SMALL_CACHE,
    assert_one_line_error,
    needs_fashion_mnist,
    small_cache_argv,
    tec_in_process,
)

pytestmark = needs_fashion_mnist




@pytest.fixture()
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory every write probe into is refused, as on a read-only mount."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    probe = outputs.probe_write

    def refuse(directory: Path) -> None:
        if directory == ro or ro in directory.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(directory))
        probe(directory)

    monkeypatch.setattr(outputs, "probe_write", refuse)
    return ro


def test_a_real_unwritable_destination_is_refused_before_any_work() -> None:
    if not Path("/sys").is_dir():
        pytest.skip("no /sys")
    with pytest.raises(UserError, match=r"--out /sys/tec-out is not writable \(/sys: .*errno \d+\); choose a "
                                        r"writable --out"):
        outputs.require_writable("/sys/tec-out")


def test_an_existing_output_file_is_writable_and_a_directory_output_that_is_a_file_is_not(tmp_path: Path) -> None:
    existing = tmp_path / "result.json"
    existing.write_text("{}")
    outputs.require_writable(existing, "--json", file=True)  # replaced by a rename: its directory counts
    outputs.require_writable(tmp_path / "new" / "result.json", "--json", file=True)
    with pytest.raises(UserError, match=r"--json .*x.json: .*result.json is a file, not a directory"):
        outputs.require_writable(existing / "x.json", "--json", file=True)
    with pytest.raises(UserError, match=r"--out .*result.json: .*result.json is a file, not a directory"):
        outputs.require_writable(existing)  # a directory output (a store, a run)
    with pytest.raises(UserError, match=r"--json .* is a directory; --json takes a file name"):
        outputs.require_writable(tmp_path, "--json", file=True)


def test_read_only_out_is_one_line_for_every_writing_command(
        read_only: Path, reference_store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import tec_pipeline.eval.frozen as frozen

    features = {"calls": 0}
    compute = frozen.shard_features

    def counted(*args: object, **kwargs: object) -> object:
        features["calls"] += 1
        return compute(*args, **kwargs)

    monkeypatch.setattr(frozen, "shard_features", counted)
    weights = tmp_path / "weights.safetensors"
    assert tec_in_process(capfd, "convert", str(pico_base), "--out", str(weights)).returncode == 0
    frozen_args = ["--checkpoint", str(weights), "--train-shards", str(fmnist_shards), "--test-shards",
                   str(fmnist_shards)]
    cases = {
        "make-shards": (["make-shards", "fashion-mnist", "--out", str(read_only / "shards"), "--limit", "10"], "--out"),
        "cache-targets": (small_cache_argv(fmnist_shards, pico_base, read_only / "store.zarr"), "--out"),
        "pretrain": (["pretrain", "--targets", str(reference_store), "--shards", str(fmnist_shards), "--out",
                      str(read_only / "run"), "--epochs", "1", "--batch-size", "32"], "--out"),
        "convert": (["convert", str(pico_base), "--out", str(read_only / "w.safetensors")], "--out"),
        "knn": (["knn", *frozen_args, "--json", str(read_only / "knn.json")], "--json"),
    }
    for name, (argv, flag) in cases.items():
        proc = tec_in_process(capfd, *argv)
        assert_one_line_error(proc)
        assert f"Error: {flag} {read_only}" in proc.stderr, (name, proc.stderr)
        assert "is not writable" in proc.stderr and "Read-only file system, errno 30" in proc.stderr, proc.stderr
        assert not list(read_only.iterdir()), f"{name} wrote into the read-only directory"
    assert features["calls"] == 0, "knn computed features before finding its output unwritable"


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][...] for name in group.array_keys()}


def test_full_disk_in_cache_targets_is_one_line_and_finished_tasks_survive(
        reference_store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "store.zarr"
    write, seen = LocalStore._set, {"data": 0}

    async def fills_up(self: LocalStore, key: str, value: object, *args: object, **kwargs: object) -> None:
        if not key.endswith("zarr.json") and not key.startswith("done/"):
            seen["data"] += 1
            if seen["data"] > 4 * 5:  # after the 4th task's 5 data chunks (and its flag): the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        return await write(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "_set", fills_up)
    proc = tec_in_process(capfd, *small_cache_argv(fmnist_shards, pico_base, out))
    monkeypatch.undo()
    assert_one_line_error(proc)
    assert "No space left on device (errno 28); finished tasks are kept" in proc.stderr, proc.stderr
    store, reference = TargetStore.open(out), TargetStore.open(reference_store)
    finished = [t for t in store.tasks() if t not in store.pending_tasks()]
    assert len(finished) == 4
    for task in finished:  # identical to an undamaged run, row for row
        ours, theirs = (s.read_rows(task.view, task.row_start, task.row_stop) for s in (store, reference))
        assert all(np.array_equal(ours[k], theirs[k]) for k in theirs), task
    assert tec_in_process(capfd, *small_cache_argv(fmnist_shards, pico_base, out)).returncode == 0
    ours, theirs = _store_arrays(out), _store_arrays(reference_store)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def _pretrain(store: Path, shards: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "--targets", str(store), "--shards", str(shards), "--out", str(run), "--epochs", "2",
            "--batch-size", "32", "--limit", "128", "--warmup-epochs", "0.5", "--deterministic", *extra]


def test_full_disk_at_a_checkpoint_is_one_line_and_the_previous_checkpoint_is_intact(
        reference_store: Path, fmnist_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run, save, calls = tmp_path / "run", torch.save, {"n": 0}

    def fails_the_second_time(obj: object, f: object, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the epoch-1 checkpoint: what torch's zip writer says on a full disk
            f.write(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                               "file data/12: file write failed")
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_the_second_time)
    proc = tec_in_process(capfd, *_pretrain(reference_store, fmnist_shards, run))
    monkeypatch.undo()
    assert_one_line_error(proc)
    assert f"cannot write checkpoint {run / 'checkpoint.pth'}: [enforce fail" in proc.stderr, proc.stderr
    assert "the previous checkpoint.pth is intact" in proc.stderr
    assert (run / "checkpoint.pth").read_bytes() == (run / "checkpoint-0.pth").read_bytes()
    assert not list(run.glob(".*tmp*"))
    resumed = tec_in_process(capfd, *_pretrain(reference_store, fmnist_shards, run))
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "checkpoint.pth", weights_only=True)["data_position"]["epoch"] == 2


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_chunk_met_in_training_names_the_chunk_and_the_repair(
        workers: int, reference_store: Path, fmnist_shards: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(reference_store, damaged)
    _flip_byte(damaged / "features" / "c" / "0" / "1" / "0" / "0")  # view 0, task 1: rows 64-128
    run = tmp_path / "run"
    proc = tec_in_process(capfd, *_pretrain(damaged, fmnist_shards, run, "--workers", str(workers)))
    assert_one_line_error(proc)
    assert f"target store {damaged}: the chunk of view 0 rows 64-128 does not decode" in proc.stderr, proc.stderr
    assert f"tec verify {damaged}" in proc.stderr and "--repair" in proc.stderr
    assert not (run / "checkpoint.pth").exists()


def test_index_shards_names_and_counts_tar_samples_without_an_image(tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    import io
    import json
    import tarfile

    from PIL import Image

    from tec_pipeline.data.shards import iter_samples

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, "PNG")
    members = [("a.png", png.getvalue()), ("a.cls", b"1"), ("b.txt", b"a caption, no image"), ("b.cls", b"0"),
               ("c.png", png.getvalue()), ("c.cls", b"2")]
    with tarfile.open(tmp_path / "data-000000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    proc = tec_in_process(capfd, "index-shards", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "2 samples, 1 shards, 1 tar samples without an image skipped ->" in proc.stdout, proc.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["total_rows"] == 2 and manifest["skipped_samples"] == 1
    assert manifest["skipped"] == ["data-000000.tar:b (b.txt, b.cls)"]
    samples = list(iter_samples(tmp_path))  # no silent invalid row: the rows are the two images
    assert [(s.row, s.key, s.label, s.image is not None) for s in samples] == [(0, "a", 1, True), (1, "c", 2, True)]


def test_off_a_terminal_every_epoch_logs_one_line(fmnist_shards: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re

    import cli

    with caplog.at_level(logging.INFO, logger="tec_pipeline.train.metrics"):  # pytest's stderr is no terminal
        cli.main(["mae-pretrain", "--shards", str(fmnist_shards), "--out", str(tmp_path / "run"), "--model",
                  "tec_pico_p4_16", "--epochs", "2", "--batch-size", "32", "--limit", "64", "--decoder-depth", "1"])
    lines = [r.getMessage() for r in caplog.records if r.name == "tec_pipeline.train.metrics"]
    pattern = r"epoch {}/2: step {}/4, loss \d+\.\d{{4}}, \d+ img/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d"
    assert len(lines) == 2 and all(re.fullmatch(pattern.format(e, 2 * e), line) for e, line in zip((1, 2), lines,
                                                                                                     strict=True)), lines


def test_off_a_terminal_stage_1_logs_a_line_every_few_tasks(fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="tec_pipeline.progress"):
        cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(tmp_path / "s.zarr"),
                                  **{**SMALL_CACHE, "chunk_rows": 32}), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "tec_pipeline.progress"]
    done = [int(m.group(1)) for line in lines
            if (m := re.fullmatch(r"cache-targets: (\d+)/20 tasks \(\d+ %\), \d+ img/s, elapsed \d+:\d\d:\d\d, "
                                  r"ETA \d+:\d\d:\d\d", line))]
    assert done == list(range(1, 21)) and len(lines) == 20, lines  # 2 views x 10 chunks, 20 lines at most


def test_stage_1_checks_free_space_for_its_pending_tasks_before_computing(
        reference_store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    from tec_pipeline.stage1.plan import SPACE_MARGIN, estimated_bytes

    store = TargetStore.open(reference_store)
    estimate = estimated_bytes(store.spec, store.tasks())
    data = sum(store.stored_bytes(f"{name}/c/") for name in store.spec.row_arrays)
    assert 0.95 * estimate / SPACE_MARGIN <= data <= estimate, (estimate, data)  # the estimate is what a store takes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 500_000, 500_000))
    out = tmp_path / "store.zarr"
    proc = tec_in_process(capfd, *small_cache_argv(fmnist_shards, pico_base, out))
    assert_one_line_error(proc)
    assert (f"the 10 pending tasks need about {estimate / 1e6:.1f} MB, but {out} has 500.0 kB free; free space or "
            "choose another --out (finished tasks are kept)") in proc.stderr, proc.stderr
    assert not out.exists()  # refused before the store is created: nothing computed, nothing written
