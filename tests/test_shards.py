"""make-shards / index-shards / the shard reader (design §3.1)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tec_pipeline.data.shards import file_sha256, index_shards, iter_samples, load_manifest
from tec_pipeline.data.writing import write_shards
from tests.conftest import FASHION_MNIST, needs_fashion_mnist

TEC = [sys.executable, "-c", "import cli; cli.main()"]


def _manifest_checks(out: Path, expected_rows: int) -> None:
    manifest = load_manifest(out)
    assert manifest.total_rows == expected_rows == sum(s.count for s in manifest.shards)
    row = 0
    for shard in manifest.shards:
        assert shard.first_row == row
        assert file_sha256(out / shard.name) == shard.sha256
        row += shard.count


def _idx(name: str) -> np.ndarray:
    data = gzip.open(FASHION_MNIST / f"{name}.gz").read()
    offset = 16 if data[3] == 3 else 8
    arr = np.frombuffer(data, np.uint8, offset=offset)
    return arr.reshape(-1, 28, 28) if data[3] == 3 else arr


@needs_fashion_mnist
def test_fashion_mnist_shards_read_back_exact_pixels(fmnist_shards: Path) -> None:
    _manifest_checks(fmnist_shards, 300)
    images, labels = _idx("train-images-idx3-ubyte"), _idx("train-labels-idx1-ubyte")
    order = np.random.default_rng(0).permutation(len(images))[:300]
    samples = list(iter_samples(fmnist_shards))
    assert [s.row for s in samples] == list(range(300))
    assert len({s.key for s in samples}) == 300 and not any("." in s.key for s in samples)
    for sample, index in zip(samples, order, strict=True):
        pixels = np.asarray(sample.image)
        assert pixels.shape == (28, 28, 3)
        assert np.array_equal(pixels[..., 0], images[index]) and np.array_equal(pixels[..., 2], images[index])
        assert sample.label == labels[index]


def test_image_folder_shards_keep_bytes_and_pixels(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = write_shards(f"imagefolder:{image_folder}", out, "train", shard_size=5, seed=3, progress=False)
    files = sorted(p for p in image_folder.rglob("*") if p.is_file())
    _manifest_checks(out, len(files))
    assert list(manifest.class_names) == ["cat", "dog"]
    by_pixels = {}
    for path in files:
        by_pixels[Image.open(path).convert("RGB").tobytes()] = ["cat", "dog"].index(path.parent.name)
    samples = list(iter_samples(out, start_row=0))
    assert len(samples) == len(files)
    for s in samples:
        assert s.image is not None and s.image.mode == "RGB"
        assert by_pixels[s.image.tobytes()] == s.label
    # reading can start at any row
    assert [s.row for s in iter_samples(out, start_row=7, stop_row=11)] == [7, 8, 9, 10]


def test_shards_are_readable_by_webdataset(image_folder: Path, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "shards"
    write_shards(f"imagefolder:{image_folder}", out, shard_size=100, progress=False)
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)]
    assert keys == [s.key for s in iter_samples(out)]


def test_index_shards_reproduces_manifest(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    made = write_shards(f"imagefolder:{image_folder}", out, shard_size=4, progress=False)
    (out / "manifest.json").unlink()
    indexed = index_shards(out, list(made.class_names))
    assert indexed.shards == made.shards
    assert indexed.fingerprint == made.fingerprint and indexed.total_rows == made.total_rows


def _bad_idx_dir(tmp: Path) -> Path:
    d = tmp / "badidx"
    d.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (d / name).write_bytes(b"not gzip at all")
    return d


@pytest.mark.parametrize("case", ["missing_dir", "empty_folder", "unknown_scheme", "bad_idx", "shard_size_0",
                                  "existing_out"])
def test_make_shards_bad_input_one_line_exit_2(case: str, tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "missing_dir": ["imagefolder:/nonexistent/dir"],
        "empty_folder": [f"imagefolder:{empty}"],
        "unknown_scheme": ["ftp:somewhere"],
        "bad_idx": [f"fashion-mnist:{_bad_idx_dir(tmp_path)}"],
        "shard_size_0": [f"imagefolder:{image_folder}", "--shard-size", "0"],
        "existing_out": [f"imagefolder:{image_folder}"],
    }[case]
    if case == "existing_out":
        write_shards(f"imagefolder:{image_folder}", out, progress=False)
    before = sorted(p.name for p in out.iterdir()) if out.exists() else []
    proc = subprocess.run([*TEC, "make-shards", *args, "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    after = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert after == before  # nothing already written was lost


def test_manifest_json_fields(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    write_shards(f"imagefolder:{image_folder}", out, shard_size=4, progress=False)
    data = json.loads((out / "manifest.json").read_text())
    assert {"shards", "total_rows", "class_names", "source", "fingerprint"} <= set(data)
    assert set(data["shards"][0]) == {"name", "count", "sha256", "first_row"}
