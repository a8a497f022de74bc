"""Progress bars on the long evaluation commands (issue 17): shown when `logs.progress_enabled()` says so
(rank 0, a terminal, TEC_NO_PROGRESS unset), and absent otherwise."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import cache_targets_argv, needs_fashion_mnist, tec_in_process

pytestmark = needs_fashion_mnist
# the bars each command shows: feature extraction of both splits, then the probe's own iterations
BARS = {"linprobe": ("features of train", "linear probe (lbfgs)"), "knn": ("features of train", "knn:")}


@pytest.mark.parametrize("enabled", [True, False], ids=["terminal", "off"])
@pytest.mark.parametrize("method", sorted(BARS))
def test_evaluation_shows_bars_only_when_enabled(method: str, enabled: bool, fmnist_shards: Path,
                                                 pico_base: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TEC_NO_PROGRESS", "0" if enabled else "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as on a terminal; the switch decides
    proc = tec_in_process(capfd, method, "--checkpoint", str(pico_base), "--train-shards", str(fmnist_shards),
                          "--test-shards", str(fmnist_shards), "--limit-train", "64", "--limit-test", "32")
    assert proc.returncode == 0, proc.stderr
    shown = [bar for bar in BARS[method] if bar in proc.stderr]
    assert shown == (list(BARS[method]) if enabled else []), proc.stderr
    if enabled:
        assert "/64" in proc.stderr and "/32" in proc.stderr  # the feature bars count the images of each split


@pytest.mark.parametrize("enabled", [True, False], ids=["terminal", "off"])
def test_verify_and_index_shards_show_bars_only_when_enabled(enabled: bool, fmnist_shards: Path, pico_base: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.zarr"
    made = tec_in_process(capfd, *cache_targets_argv(fmnist_shards, pico_base, store,
                                                     {"views": 1, "topk": 4, "limit": 64, "chunk_rows": 32}))
    assert made.returncode == 0, made.stderr
    monkeypatch.setenv("TEC_NO_PROGRESS", "0" if enabled else "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    verify = tec_in_process(capfd, "verify", str(store), "--shards", str(fmnist_shards), "--recompute", "2")
    assert verify.returncode == 0, verify.stderr
    copy = shutil.copytree(fmnist_shards, tmp_path / "shards")  # index-shards rewrites the manifest
    index = tec_in_process(capfd, "index-shards", str(copy))
    assert index.returncode == 0, index.stderr
    for proc, bars in ((verify, ("chunks checked", "rows recomputed")), (index, ("shards indexed",))):
        assert [b for b in bars if b in proc.stderr] == (list(bars) if enabled else []), proc.stderr
