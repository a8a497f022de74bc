"""Stage 1 (`tec cache-targets`): the store contract, exactness, executors, resume and refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tec_pipeline.data.shards import iter_samples
from tec_pipeline.data.views import ViewBox, replay_view
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import (
    SLOW_WRITER,
    assert_one_line_error,
    kill_half_way,
    needs_fashion_mnist,
    tec_in_process,
)

pytestmark = needs_fashion_mnist
ARRAYS = ("features", "attention", "topk_index", "boxes", "valid", "done")


def _cfg(shards: Path, base: Path, out: Path, **kw: object) -> CacheConfig:
    return CacheConfig(shards=str(shards), base_model=str(base), out=str(out), **{
        "views": 2, "topk": 4, "chunk_rows": 64, "batch_size": 32, "loader_workers": 0, **kw})


@pytest.fixture(scope="module")
def fp32_store(fmnist_shards: Path, pico_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "fp32.zarr"
    cache_targets(_cfg(fmnist_shards, pico_base, out, codec="fp32"))
    return out


def _arrays(url: Path | str) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(url), mode="r")
    return {name: group[name][...] for name in group.array_keys()}


def test_store_layout_matches_contract(fp32_store: Path) -> None:
    group = zarr.open_group(str(fp32_store), mode="r")
    L, D, H, k, C = 16, 48, 2, 4, 64
    expected = {"features": ((2, 300, L, D), (1, C, L, D), "float32"),
                "attention": ((2, 300, 1 + k, H, L), (1, C, 1 + k, H, L), "float32"),
                "topk_index": ((2, 300, k), (1, C, k), "int16"), "boxes": ((2, 300, 5), (1, C, 5), "int32"),
                "valid": ((2, 300), (1, C), "bool")}
    for name, (shape, chunks, dtype) in expected.items():
        arr = group[name]
        assert (arr.shape, arr.chunks, str(arr.dtype)) == (shape, chunks, dtype), name
    assert group["done"].shape == (2, 5) and group["done"][...].all()
    tec = dict(group.attrs)["tec"]
    assert tec["base_model"]["sha256"] and tec["base_model"]["embed_dim"] == D and tec["targets"]["k"] == k
    assert tec["views"]["count"] == 2 and tec["data"]["rows"] == 300 and tec["format_version"]
    assert tec["views"]["interpolation"] == "PIL.BICUBIC" and tec["package_version"]


def test_stored_targets_equal_direct_computation(fp32_store: Path, fmnist_shards: Path, pico_base: Path) -> None:
    store = TargetStore.open(str(fp32_store))
    model, _ = load_encoder(pico_base)
    images = {s.row: s.image for s in iter_samples(fmnist_shards)}
    for view, row in [(0, 0), (1, 63), (0, 64), (1, 299), (0, 150)]:
        stored = store.read_rows(view, row, row + 1)
        assert stored["valid"][0]
        box = ViewBox.from_array(stored["boxes"][0])
        x = replay_view(images[row], box, 16).unsqueeze(0)
        with torch.no_grad():
            direct = stored_targets(model, x, 4, 2)
        # another batch composition may move float32 results in the last bits only
        np.testing.assert_allclose(stored["features"], direct["features"].numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(stored["attention"], direct["attention"].numpy(), atol=1e-5, rtol=1e-5)
        assert np.array_equal(stored["topk_index"], direct["topk_index"].numpy())


def test_fp16_and_int8_within_codec_tolerance(fp32_store: Path, fmnist_shards: Path, pico_base: Path,
                                              tmp_path: Path) -> None:
    exact = _arrays(fp32_store)
    for codec, feature_tol in (("fp16", 2e-3), ("int8", 0.05)):
        out = tmp_path / f"{codec}.zarr"
        cache_targets(_cfg(fmnist_shards, pico_base, out, codec=codec))
        rows = TargetStore.open(str(out)).read_rows(1, 0, 300)
        scale = np.abs(exact["features"][1]).max(axis=-1, keepdims=True)
        assert np.all(np.abs(rows["features"] - exact["features"][1]) <= feature_tol * np.maximum(scale, 1))
        np.testing.assert_allclose(rows["attention"], exact["attention"][1], rtol=2e-3, atol=2e-3)
        assert np.array_equal(rows["boxes"], exact["boxes"][1])


@pytest.mark.slow
def test_dask_workers_write_identical_store(fp32_store: Path, fmnist_shards: Path, pico_base: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "dask.zarr"
    summary = cache_targets(_cfg(fmnist_shards, pico_base, out, codec="fp32", workers=2))
    assert summary["compute_cpu_s"] is None  # computed in the workers, not here
    ours, reference = _arrays(out), _arrays(fp32_store)
    for name in ARRAYS:
        assert np.array_equal(ours[name], reference[name]), name


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_store(fp32_store: Path, fmnist_shards: Path, pico_base: Path,
                                                  tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "killed.zarr"
    args = ["cache-targets", "--shards", str(fmnist_shards), "--base-model", str(pico_base), "--out", str(out),
            "--views", "2", "--topk", "4", "--chunk-rows", "64", "--batch-size", "32", "--codec", "fp32",
            "--loader-workers", "0"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "0.2", *args], stderr=subprocess.DEVNULL,
                            start_new_session=True)  # slowed: on a busy machine it could finish before the kill
    kill_half_way(proc, str(out))
    rerun = tec_in_process(capfd, *args)  # the rerun, in this process: the killed run is the one that needs its own
    assert rerun.returncode == 0, rerun.stderr
    ours, reference = _arrays(out), _arrays(fp32_store)
    for name in ARRAYS:
        assert np.array_equal(ours[name], reference[name]), name


def test_verify_and_inspect_detect_problems(fp32_store: Path, fmnist_shards: Path, pico_base: Path,
                                            tmp_path: Path, image_folder: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    import shutil

    from tec_pipeline.data.writing import write_shards

    ok = tec_in_process(capfd, "verify", str(fp32_store), "--shards", str(fmnist_shards), "--recompute", "3")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    inspected = tec_in_process(capfd, "inspect", str(fp32_store), "--json")
    assert inspected.returncode == 0 and '"tasks_done": 10' in inspected.stdout

    other = tmp_path / "other"
    write_shards(f"imagefolder:{image_folder}", other, progress=False)
    wrong = tec_in_process(capfd, "verify", str(fp32_store), "--shards", str(other))
    assert wrong.returncode == 1 and "other shards" in wrong.stderr

    broken = tmp_path / "broken.zarr"
    shutil.copytree(fp32_store, broken)
    zarr.open_group(str(broken), mode="r+")["done"][1, 2] = False
    (broken / "features" / "c" / "0" / "1" / "0" / "0").write_bytes(b"garbage")
    result = tec_in_process(capfd, "verify", str(broken), "--shards", str(fmnist_shards))
    assert result.returncode == 1
    assert "view 1: 1 of 5 tasks not done" in result.stderr and "features" in result.stderr


@pytest.mark.parametrize("case", ["missing_shards", "no_manifest", "unknown_codec", "views_0", "bad_checkpoint",
                                  "other_config"])
def test_bad_input_one_line_exit_2(case: str, fp32_store: Path, fmnist_shards: Path, pico_base: Path,
                                   tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    args = {"shards": str(fmnist_shards), "base-model": str(pico_base), "out": str(tmp_path / "s.zarr"),
            "codec": "fp32", "topk": "4", "chunk-rows": "64"}
    args.update({"missing_shards": {"shards": "/nonexistent"}, "no_manifest": {"shards": str(tmp_path / "empty")},
                 "unknown_codec": {"codec": "bf12"}, "views_0": {"views": "0"}, "bad_checkpoint": {"base-model": str(junk)},
                 "other_config": {"out": str(fp32_store), "topk": "3"}}[case])
    before = _arrays(fp32_store)
    proc = tec_in_process(capfd, "cache-targets", *[x for k, v in args.items() for x in (f"--{k}", v)])
    assert_one_line_error(proc)
    after = _arrays(fp32_store)
    assert all(np.array_equal(before[n], after[n]) for n in ARRAYS)  # nothing already written was touched


def test_existing_store_of_same_config_is_resumed_not_overwritten(fp32_store: Path, fmnist_shards: Path,
                                                                   pico_base: Path) -> None:
    before = _arrays(fp32_store)
    summary = cache_targets(_cfg(fmnist_shards, pico_base, fp32_store, codec="fp32"))
    assert summary["tasks_run"] == 0
    after = _arrays(fp32_store)
    assert all(np.array_equal(before[n], after[n]) for n in ARRAYS)


def test_fsspec_memory_url(fmnist_shards: Path, pico_base: Path) -> None:
    url = "memory://tec-test/store.zarr"
    cache_targets(_cfg(fmnist_shards, pico_base, url, codec="fp16", limit=100, views=1))
    store = TargetStore.open(url)
    assert store.done_mask().all() and store.read_rows(0, 0, 100)["valid"].all()
