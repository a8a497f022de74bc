"""Stage 1's store identity and refusals (issues 13 and 18): precision and device recorded, a resume with
another refused; the base model known by content (a moved or differently named checkpoint is the same);
--topk, --amp, free space and failed writes as one line with nothing finished lost; stage 2 refuses another
replay implementation."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import assert_one_line_error, needs_fashion_mnist, tec_in_process

pytestmark = needs_fashion_mnist
FLAGS = {"views": "1", "topk": "4", "chunk-rows": "64", "batch-size": "32", "codec": "fp16", "loader-workers": "0",
         "limit": "128"}


def _argv(shards: Path, base: Path | str, out: Path, **extra: str) -> list[str]:
    flags = {**FLAGS, **extra}
    return ["cache-targets", "--shards", str(shards), "--base-model", str(base), "--out", str(out),
            *[x for k, v in flags.items() for x in (f"--{k}", v)]]


@pytest.fixture()
def store(fmnist_shards: Path, pico_base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "s.zarr"
    cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(out), views=1, topk=4,
                              chunk_rows=64, batch_size=32, codec="fp16", loader_workers=0, limit=128))
    return out


def _bytes(url: Path) -> dict[str, bytes]:
    return {str(p.relative_to(url)): p.read_bytes() for p in sorted(url.rglob("*")) if p.is_file()}


def test_store_records_precision_device_and_replay(store: Path) -> None:
    from tec_pipeline.data.views import DEFAULT_REPLAY, REPLAYS

    attrs = TargetStore.open(store).attrs
    assert attrs["targets"]["precision"] == {"autocast": "none", "device_type": "cpu"}
    assert attrs["views"]["replay"] == REPLAYS[DEFAULT_REPLAY]


@pytest.mark.parametrize("flags, message", [({"amp": "fp16"}, "--amp fp16 needs a CUDA device"),
                                            ({"amp": "bf16"}, "--amp bf16 needs a CUDA device"),
                                            ({"topk": "0"}, "--topk must be >= 1"),
                                            ({"topk": "-3"}, "--topk must be >= 1")])
def test_bad_amp_or_topk_one_line(flags: dict[str, str], message: str, fmnist_shards: Path, pico_base: Path,
                                  tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new.zarr"
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, out, **flags))
    assert_one_line_error(proc)
    assert message in proc.stderr and not out.exists()


def test_resume_with_other_precision_is_refused(store: Path, fmnist_shards: Path, pico_base: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    group = zarr.open_group(str(store), mode="r+")
    tec = dict(group.attrs)["tec"]
    tec["targets"]["precision"] = {"autocast": "bf16", "device_type": "cuda"}  # as a GPU run records it
    group.attrs["tec"] = tec
    before = _bytes(store)
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, store))
    assert_one_line_error(proc)
    assert "targets.precision" in proc.stderr and "bf16" in proc.stderr
    assert _bytes(store) == before


def test_moved_base_model_is_the_same_base_model(store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    moved = tmp_path / "moved" / "base.pth"
    moved.parent.mkdir()
    shutil.copy(pico_base, moved)
    monkeypatch.chdir(tmp_path)
    before = _bytes(store)
    for name in (str(moved), "moved/base.pth"):  # absolute and relative
        proc = tec_in_process(capfd, *_argv(fmnist_shards, name, store))
        assert proc.returncode == 0, proc.stderr
        assert "0 of 2 tasks computed" in proc.stdout
    assert _bytes(store) == before
    other = tmp_path / "other.pth"
    from tests.conftest import save_base_checkpoint

    save_base_checkpoint(other, seed=1)
    proc = tec_in_process(capfd, *_argv(fmnist_shards, other, store))
    assert_one_line_error(proc)
    assert "base_model.sha256" in proc.stderr


def test_verify_finds_the_base_model_by_content(store: Path, fmnist_shards: Path, pico_base: Path,
                                                tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(pico_base, moved)
    group = zarr.open_group(str(store), mode="r+")
    tec = dict(group.attrs)["tec"]
    tec["base_model"]["source"] = str(tmp_path / "gone.pth")  # the recorded path no longer exists
    group.attrs["tec"] = tec
    missing = tec_in_process(capfd, "verify", str(store), "--shards", str(fmnist_shards), "--recompute", "2")
    assert_one_line_error(missing)
    assert "--base-model" in missing.stderr
    ok = tec_in_process(capfd, "verify", str(store), "--shards", str(fmnist_shards), "--recompute", "3",
                        "--base-model", str(moved))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


def test_verify_top_k_allows_near_ties_only() -> None:
    from tec_pipeline.store.verify import topk_agrees

    scores = np.array([5.0, 4.0, 3.0, 3.0 + 1e-6, 1.0])
    assert topk_agrees(np.array([0, 1, 2]), scores, 1e-3)  # 2 and 3 are tied within the allowance
    assert topk_agrees(np.array([0, 1, 3]), scores, 1e-3)
    assert not topk_agrees(np.array([0, 1, 4]), scores, 1e-3)  # a clearly lower patch
    assert not topk_agrees(np.array([0, 0, 1]), scores, 1e-3)  # duplicates


def test_not_enough_free_space_is_refused_before_any_store(fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                                                          capfd: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import tec_pipeline.outputs as outputs

    real = shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "full.zarr"
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, out))
    assert_one_line_error(proc)
    assert "kB free; free space or choose another --out" in proc.stderr and not out.exists()


def test_read_only_out_one_line_before_any_store(fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import tec_pipeline.outputs as outputs

    def read_only(directory: Path) -> None:  # root ignores chmod: the write probe is what sees a read-only mount
        raise OSError(errno.EROFS, "Read-only file system", str(directory))

    monkeypatch.setattr(outputs, "probe_write", read_only)
    out = tmp_path / "ro.zarr"
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, out))
    assert_one_line_error(proc)
    assert "Read-only file system" in proc.stderr and not out.exists()


def test_disk_full_mid_run_one_line_and_finished_tasks_kept(store: Path, fmnist_shards: Path, pico_base: Path,
                                                            tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "filling.zarr"
    writes = {"n": 0}
    real = TargetStore.write_task

    def fill_up(self: TargetStore, task: object, **arrays: np.ndarray) -> None:
        writes["n"] += 1
        if writes["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "features"))
        real(self, task, **arrays)

    monkeypatch.setattr(TargetStore, "write_task", fill_up)
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, out))
    assert_one_line_error(proc)
    assert "No space left on device (errno 28); finished tasks are kept" in proc.stderr, proc.stderr
    monkeypatch.setattr(TargetStore, "write_task", real)
    assert TargetStore.open(out).done_mask().sum() == 1
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, out))  # the rerun finishes it
    assert proc.returncode == 0 and "1 of 2 tasks computed" in proc.stdout
    reference = TargetStore.open(store).read_rows(0, 0, 128)
    for name, value in TargetStore.open(out).read_rows(0, 0, 128).items():
        assert np.array_equal(value, reference[name]), name


def test_stage2_refuses_another_replay(store: Path, fmnist_shards: Path) -> None:
    from tec_pipeline.data.shards import load_manifest
    from tec_pipeline.models.vit import resolve_arch
    from tec_pipeline.train.pretrain import store_mismatches

    group = zarr.open_group(str(store), mode="r+")
    tec = dict(group.attrs)["tec"]
    tec["views"]["replay"] = {**tec["views"]["replay"], "implementation": "pillow-simd crop+resize"}
    group.attrs["tec"] = tec
    reasons = store_mismatches(TargetStore.open(store), load_manifest(fmnist_shards),
                               resolve_arch("tec_pico_p4_16"), 4, False)
    assert any("replayed by" in r and "pillow-simd" in r for r in reasons), reasons


def test_torch_replay_store_recorded_replayed_and_verified(fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    """A `--replay torch` store records that replay; stage 2 and verify replay with it (not the default): with
    fp32 targets, a recomputation from the default replay's pixels is caught, the recorded one's matches."""
    from tec_pipeline.data.shards import iter_samples, load_manifest
    from tec_pipeline.data.views import REPLAYS, ViewBox, replay_view_uint8
    from tec_pipeline.stage1.decode import decode_task
    from tec_pipeline.stage2.cached import CachedViews
    from tec_pipeline.store.layout import Task

    out = tmp_path / "torch.zarr"
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, out, codec="fp32", replay="torch"))
    assert proc.returncode == 0, proc.stderr
    store = TargetStore.open(out)
    assert store.attrs["views"]["replay"] == REPLAYS["torch"]
    size = store.attrs["base_model"]["input_size"]
    stage1 = decode_task(str(fmnist_shards), load_manifest(fmnist_shards), Task(0, 0, 0, 64), 0, size, "torch")
    stage2 = CachedViews(str(out), 0, size)
    assert stage2.replay == "torch"
    differ = 0
    for sample in iter_samples(str(fmnist_shards), 0, 64, load_manifest(fmnist_shards)):
        item = stage2(sample, stage2.stored(sample.row))  # stage 2's pixels are stage 1's, bit for bit
        assert torch.equal(item["pixels"], stage1.pixels[sample.row]), sample.row
        box = ViewBox.from_array(stage2.stored(sample.row)["boxes"])
        differ += not torch.equal(item["pixels"], replay_view_uint8(sample.image, box, size, "pil"))
    assert differ > 0  # the two replays do differ on these images: which one is used matters

    ok = tec_in_process(capfd, "verify", str(out), "--shards", str(fmnist_shards), "--recompute", "8")
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    group = zarr.open_group(str(out), mode="r+")
    tec = dict(group.attrs)["tec"]
    tec["views"]["replay"] = REPLAYS["pil"]  # now verify replays with the wrong one
    group.attrs["tec"] = tec
    wrong = tec_in_process(capfd, "verify", str(out), "--shards", str(fmnist_shards), "--recompute", "8")
    assert wrong.returncode == 1 and "differ from a recomputation" in wrong.stderr, wrong.stderr


def test_resume_with_other_replay_is_refused(store: Path, fmnist_shards: Path, pico_base: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    before = _bytes(store)
    proc = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, store, replay="torch"))
    assert_one_line_error(proc)
    assert "views.replay" in proc.stderr and "torch" in proc.stderr, proc.stderr
    assert _bytes(store) == before
    bad = tec_in_process(capfd, *_argv(fmnist_shards, pico_base, store.with_name("x.zarr"), replay="simd"))
    assert bad.returncode == 2 and "simd" in bad.stderr


def test_summary_reports_the_compute_steps_cpu(fmnist_shards: Path, pico_base: Path, tmp_path: Path) -> None:
    """In process, the summary carries the CPU seconds of the compute step (what `tec bench` subtracts from the
    host path on a CPU device): positive, and a part of the run's own CPU time."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = cpu()
    summary = cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base),
                                        out=str(tmp_path / "c.zarr"), views=2, topk=4, chunk_rows=64, batch_size=32,
                                        codec="fp16", loader_workers=0, limit=128))
    assert summary["images"] == 256 and 0 < summary["compute_cpu_s"] < cpu() - before
