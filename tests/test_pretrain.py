"""Stage 2 (`tec pretrain`): cached equals online, exact resume, DDP, learning, refusals."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tec_pipeline.data.loader import FreshViews, normalized, stream_epoch
from tec_pipeline.data.shards import load_manifest
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.student import TECStudent
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.stage2.cached import CachedViews
from tec_pipeline.store.target_store import TargetStore
from tec_pipeline.train.pretrain import store_mismatches
from tests.conftest import (
    assert_one_line_error,
    free_port,
    needs_fashion_mnist,
    tec_in_process,
    tensorboard_scalars,
)

pytestmark = needs_fashion_mnist
K = 4


@pytest.fixture(scope="module")
def store(fmnist_shards: Path, pico_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "fp32 store.zarr"
    cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(out), views=2,
                              topk=K, chunk_rows=64, codec="fp32", loader_workers=0))
    return out


def _first_batch(shards: Path, item_fn: object) -> dict:
    return next(iter(normalized(stream_epoch(shards, item_fn, 32, seed=0, epoch=0))))


def test_cached_step_equals_online_step(store: Path, fmnist_shards: Path, pico_base: Path) -> None:
    arch = TargetStore.open(str(store)).attrs["base_model"]["arch"]["name"]
    cached = _first_batch(fmnist_shards, CachedViews(str(store), 0, 16))
    online = _first_batch(fmnist_shards, FreshViews(16, seed=0, view_id=0))
    assert torch.equal(cached["rows"], online["rows"]) and torch.equal(cached["images"], online["images"])
    base, _ = load_encoder(pico_base)
    with torch.no_grad():
        fresh = stored_targets(base, online["images"], K, 2)
    from tec_pipeline.models.vit import resolve_arch

    params, losses = [], []
    noise = torch.rand(32, 16, generator=torch.Generator().manual_seed(1))
    for targets in ({k: cached[k] for k in fresh}, fresh):
        torch.manual_seed(0)
        student = TECStudent(resolve_arch(arch), k=K)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95))
        out = student(cached["images"], targets, noise=noise)
        out["loss"].backward()
        opt.step()
        losses.append(torch.stack([out["loss_fea"], out["loss_att"]]).detach())
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.allclose(losses[0], losses[1], atol=1e-6, rtol=0)
    assert torch.allclose(params[0], params[1], atol=1e-6, rtol=0)


def _pretrain_args(shards: Path, out: Path, source: list[str], *extra: str) -> list[str]:
    return ["pretrain", *source, "--shards", str(shards), "--out", str(out), "--epochs", "2", "--batch-size", "32",
            "--blr", "1e-3", "--warmup-epochs", "0.5", "--seed", "3", "--deterministic", "--log-every", "1", *extra]


def _in_process(capfd: pytest.CaptureFixture[str], *args: str) -> int:
    """`tec ARGS` in this interpreter (a fresh one costs ~9 CPU s of imports); its exit code, stderr on failure."""
    proc = tec_in_process(capfd, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_weights(store: Path, fmnist_shards: Path, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    source = ["--targets", str(store)]
    full = tmp_path / "full"  # in this process: only the killed run needs one of its own
    assert _in_process(capfd, *_pretrain_args(fmnist_shards, full, source)) == 0
    killed = tmp_path / "killed run"
    args = _pretrain_args(fmnist_shards, killed, source, "--save-every", "1")
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", *args], stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = killed / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 13:  # header + 12 steps: mid-epoch 2
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    position = torch.load(killed / "checkpoint.pth", weights_only=True)["data_position"]
    assert (position["epoch"], position["batch"]) < (2, 0), "the run finished before it could be killed"
    assert _in_process(capfd, *args) == 0
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(store: Path, fmnist_shards: Path, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    source = ["--targets", str(store)]
    one = tmp_path / "one"
    assert _in_process(capfd, *_pretrain_args(fmnist_shards, one, source)) == 0
    two = tmp_path / "two"
    args = _pretrain_args(fmnist_shards, two, source)
    args[args.index("--batch-size") + 1] = "16"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "cli.py", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [ln for ln in proc.stdout.splitlines() if "optimizer steps" in ln]
    assert steps, proc.stdout
    rows_one = (one / "metrics.csv").read_text().splitlines()
    rows_two = (two / "metrics.csv").read_text().splitlines()
    assert len(rows_one) == len(rows_two)  # same global batch -> same number of steps
    final = [float(r.splitlines()[-1].split(",")[3]) for r in (rows_one[-1], rows_two[-1])]
    assert abs(final[0] - final[1]) < 0.1 * final[0], final


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_loss_falls(mode: str, store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                    capfd: pytest.CaptureFixture[str]) -> None:
    source = ["--targets", str(store)] if mode == "cached" else ["--base-model", str(pico_base), "--topk", str(K)]
    out = tmp_path / mode
    args = _pretrain_args(fmnist_shards, out, source)
    args[args.index("--epochs") + 1] = "4"
    assert _in_process(capfd, *args) == 0
    rows = [ln.split(",") for ln in (out / "metrics.csv").read_text().splitlines()[1:]]
    losses = np.array([float(r[3]) for r in rows])
    assert losses[-5:].mean() < 0.9 * losses[:5].mean(), losses
    scalars = tensorboard_scalars(out)  # TensorBoard holds the same per-step record as metrics.csv
    assert {"train/loss", "train/loss_fea", "train/loss_att", "train/lr", "train/img_per_s",
            "train/data_wait"} <= set(scalars), sorted(scalars)
    np.testing.assert_allclose(scalars["train/loss"], losses, rtol=1e-6)


def test_store_mismatches_are_named(store: Path, fmnist_shards: Path, tmp_path: Path, image_folder: Path) -> None:
    from tec_pipeline.data.writing import write_shards
    from tec_pipeline.models.vit import resolve_arch

    target_store = TargetStore.open(str(store))
    arch = resolve_arch("tec_pico_p4_16")
    manifest = load_manifest(fmnist_shards)
    assert store_mismatches(target_store, manifest, arch, K, False) == []
    other = load_manifest(write_shards(f"imagefolder:{image_folder}", tmp_path / "o", progress=False) and tmp_path / "o")
    assert "other shards" in store_mismatches(target_store, other, arch, K, False)[0]
    bigger = dataclasses.replace(arch, img_size=20)  # 5x5 patches, the store's are 4x4
    assert any("patch grid is 4x4" in r and "5x5" in r for r in store_mismatches(target_store, manifest, bigger, K, False))
    # another width, depth or head count is a cross-size student (spec §3.6b), not a mismatch
    other_size = dataclasses.replace(arch, embed_dim=64, num_heads=4, depth=6)
    assert store_mismatches(target_store, manifest, other_size, K, False) == []
    same_grid = dataclasses.replace(arch, img_size=32, patch_size=8)  # other input size, same 4x4 grid
    assert store_mismatches(target_store, manifest, same_grid, K, False) == []
    assert any("top-4" in r for r in store_mismatches(target_store, manifest, arch, K + 1, False))


def test_refusals_before_any_step(store: Path, fmnist_shards: Path, tmp_path: Path,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(store, partial)
    zarr.open_group(str(partial), mode="r+")["done"][0, 1] = False
    out = tmp_path / "run"
    proc = tec_in_process(capfd, *_pretrain_args(fmnist_shards, out, ["--targets", str(partial)]))
    assert_one_line_error(proc)
    assert "unfinished" in proc.stderr and not (out / "checkpoint.pth").exists()
    wrong_model = tec_in_process(capfd, *_pretrain_args(fmnist_shards, out, ["--targets", str(store), "--model", "tec_micro_p4_28"]))
    assert_one_line_error(wrong_model)
    assert "patch grid is 4x4" in wrong_model.stderr and "--input-size 16" in wrong_model.stderr
    allowed = tec_in_process(capfd, *_pretrain_args(fmnist_shards, out, ["--targets", str(partial), "--allow-partial"]))
    assert allowed.returncode == 0, allowed.stderr


def _first_images(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], *args: str) -> torch.Tensor:
    """The images of the first batch `tec pretrain ARGS` (in-process) trains on."""
    from tec_pipeline.train import pretrain as stage

    seen: list[torch.Tensor] = []
    step = stage._Step.__call__
    monkeypatch.setattr(stage._Step, "__call__", lambda self, model, batch: seen.append(batch["images"])
                        or step(self, model, batch))
    proc = tec_in_process(capfd, *args)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.undo()
    return seen[0]


def test_views_agree_between_modes_through_the_view_seed(store: Path, fmnist_shards: Path, pico_base: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    stored_seed = TargetStore.open(str(store)).attrs["views"]["seed"]
    common = ["--epochs", "1", "--limit", "64", "--seed", "3", "--log-every", "1"]
    online = tmp_path / "online"
    online_images = _first_images(monkeypatch, capfd, *_pretrain_args(
        fmnist_shards, online, ["--base-model", str(pico_base), "--topk", str(K), "--view-seed", str(stored_seed)]),
        *common)
    assert torch.load(online / "checkpoint.pth", weights_only=True)["view_seed"] == stored_seed
    assert f"view_seed: {stored_seed}" in (online / "config.yaml").read_text()
    cached = tmp_path / "cached"
    cached_images = _first_images(monkeypatch, capfd, *_pretrain_args(fmnist_shards, cached, ["--targets", str(store)]),
                                  *common)
    assert torch.equal(online_images, cached_images)  # --seed 3 differs from the store's; the views do not
    assert torch.load(cached / "checkpoint.pth", weights_only=True)["view_seed"] == stored_seed
    default = _first_images(monkeypatch, capfd, *_pretrain_args(
        fmnist_shards, tmp_path / "default", ["--base-model", str(pico_base), "--topk", str(K)]), *common)
    assert not torch.equal(default, cached_images)  # without --view-seed, online views come from --seed
    refused = tec_in_process(capfd, *_pretrain_args(fmnist_shards, tmp_path / "refused", ["--targets", str(store)]),
                             "--view-seed", str(stored_seed + 1))
    assert_one_line_error(refused)
    assert f"differs from the view seed {stored_seed}" in refused.stderr
    assert not (tmp_path / "refused").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is allowed where CUDA is")
def test_amp_fp16_without_cuda_is_one_line(store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    pretrain = tec_in_process(capfd, *_pretrain_args(fmnist_shards, tmp_path / "p", ["--targets", str(store)]),
                              "--amp", "fp16")
    finetune = tec_in_process(capfd, "finetune", "--checkpoint", str(pico_base), "--train-shards",
                              str(fmnist_shards), "--test-shards", str(fmnist_shards), "--out", str(tmp_path / "f"),
                              "--amp", "fp16", "--epochs", "1")
    for proc in (pretrain, finetune):
        assert_one_line_error(proc)
        assert "--amp fp16 needs a CUDA device" in proc.stderr


def test_final_line_reports_the_final_loss(store: Path, fmnist_shards: Path, tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    import csv

    out = tmp_path / "run"
    proc = tec_in_process(capfd, *_pretrain_args(fmnist_shards, out, ["--targets", str(store)]), "--limit", "64")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    expected = (f"{len(rows)} optimizer steps, 2 epochs, final loss {float(rows[-1]['loss']):.4f} -> "
                f"{out / 'checkpoint.pth'}")
    assert proc.stdout.splitlines()[-1] == expected, proc.stdout
    again = tec_in_process(capfd, *_pretrain_args(fmnist_shards, out, ["--targets", str(store)]), "--limit", "64")
    assert again.stdout.splitlines()[-1].endswith(", final loss n/a -> " + str(out / "checkpoint.pth")), again.stdout
