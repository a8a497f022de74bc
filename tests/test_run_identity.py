"""A run directory holds one run (issue 18): a resume that would change the run is refused naming each
difference, --no-resume never mixes two runs, --overwrite clears the old run first, --init-from starts a new
run from a finished one's weights, and a refusal changes nothing already written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import zarr

from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.train import checkpoint as ckpt_io
from tec_pipeline.train.run_dir import RUN_FILE, remove_stale_temp_files
from tests.conftest import assert_one_line_error, needs_fashion_mnist, tec_in_process

pytestmark = needs_fashion_mnist
MAE_ARGS = ("--model", "tec_pico_p4_16", "--batch-size", "32", "--limit", "64", "--warmup-epochs", "0.5",
            "--decoder-depth", "1", "--deterministic")


@pytest.fixture(scope="module")
def store(fmnist_shards: Path, pico_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("identity") / "store.zarr"
    cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(out), views=2,
                              topk=4, chunk_rows=64, codec="fp32", loader_workers=0))
    return out


def _pretrain(shards: Path, run: Path, source: list[str], *extra: str) -> list[str]:
    return ["pretrain", *source, "--shards", str(shards), "--out", str(run), "--epochs", "2", "--batch-size", "16",
            "--limit", "64", "--blr", "1e-3", "--warmup-epochs", "0.5", "--deterministic", *extra]


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run directory, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture()
def finished(store: Path, fmnist_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> Path:
    """A finished 2-epoch cached run (checkpoint.pth, checkpoint-0.pth, checkpoint-1.pth, metrics, run.json)."""
    run = tmp_path / "run"
    proc = tec_in_process(capfd, *_pretrain(fmnist_shards, run, ["--targets", str(store)]))
    assert proc.returncode == 0, proc.stderr
    return run


def test_a_resume_with_other_settings_is_refused_naming_each_difference(
        finished: Path, store: Path, fmnist_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(finished)
    assert {"checkpoint.pth", "checkpoint-0.pth", "checkpoint-1.pth", "config.yaml", "metrics.csv",
            RUN_FILE} <= set(before)
    cached = ["--targets", str(store)]
    cases = {  # argv -> every difference the refusal must name, stored and given
        "schedule": (_pretrain(fmnist_shards, finished, cached, "--blr", "0.5", "--epochs", "3", "--mask-ratio", "0.5"),
                     ["blr: stored 0.001, given 0.5", "epochs: stored 2, given 3", "mask_ratio: stored 0.75, given 0.5"]),
        "loader split": (_pretrain(fmnist_shards, finished, cached, "--workers", "1"), ["workers: stored 0, given 1"]),
    }
    for name, (argv, named) in cases.items():
        proc = tec_in_process(capfd, *argv)
        assert_one_line_error(proc)
        assert f"{finished} holds another run (" in proc.stderr, proc.stderr
        for difference in named:
            assert difference in proc.stderr, (name, proc.stderr)
        assert "--overwrite" in proc.stderr and f"--init-from {finished / 'checkpoint.pth'}" in proc.stderr
        assert _snapshot(finished) == before, f"{name}: a refused resume changed the run directory"


def test_online_mode_and_another_store_are_other_runs(
        finished: Path, store: Path, fmnist_shards: Path, pico_base: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(finished)
    online = tec_in_process(capfd, *_pretrain(fmnist_shards, finished, ["--base-model", str(pico_base), "--topk", "4"]))
    assert_one_line_error(online)
    assert "base_model: stored None, given {" in online.stderr and "targets: stored {" in online.stderr
    other = tmp_path / "other store.zarr"  # the same store, as if made from another base model
    shutil.copytree(store, other)
    group = zarr.open_group(str(other), mode="r+")
    attrs = dict(group.attrs["tec"])
    attrs["base_model"] = {**attrs["base_model"], "sha256": "0" * 64}
    group.attrs["tec"] = attrs
    proc = tec_in_process(capfd, *_pretrain(fmnist_shards, finished, ["--targets", str(other)]))
    assert_one_line_error(proc)
    assert "targets.content: stored '" in proc.stderr, proc.stderr
    assert _snapshot(finished) == before


def test_settings_that_do_not_change_the_result_may_change(
        finished: Path, store: Path, fmnist_shards: Path, capfd: pytest.CaptureFixture[str]) -> None:
    moved = finished.with_name("moved run")  # a moved run directory, another checkpoint cadence and device
    shutil.move(finished, moved)
    before = _snapshot(moved)
    proc = tec_in_process(capfd, *_pretrain(fmnist_shards, moved, ["--targets", str(store)], "--save-every", "1",
                                            "--device", "cpu", "--log-every", "3"))
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(moved)["checkpoint.pth"] == before["checkpoint.pth"]  # finished: nothing left to train


def test_no_resume_into_a_run_is_refused_and_overwrite_clears_the_old_run(
        finished: Path, store: Path, fmnist_shards: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(finished)
    again = tec_in_process(capfd, *_pretrain(fmnist_shards, finished, ["--targets", str(store)], "--no-resume"))
    assert_one_line_error(again)
    assert "already holds this run (--no-resume was given); pass --overwrite" in again.stderr
    # the case: another batch size and fewer epochs into the same directory
    argv = _pretrain(fmnist_shards, finished, ["--targets", str(store)], "--no-resume")
    argv[argv.index("--epochs") + 1], argv[argv.index("--batch-size") + 1] = "1", "32"
    mixed = tec_in_process(capfd, *argv)
    assert_one_line_error(mixed)
    assert "batch_size: stored 16, given 32" in mixed.stderr and _snapshot(finished) == before
    replaced = tec_in_process(capfd, *argv, "--overwrite", "--log-every", "1")  # log_every may change: a row a step
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in finished.glob("checkpoint*.pth")) == ["checkpoint-0.pth", "checkpoint.pth"]
    for name in ("checkpoint.pth", "checkpoint-0.pth"):
        ck = torch.load(finished / name, weights_only=True)
        assert ck["loop"]["batch_size"] == 32 and ck["loop"]["epochs"] == 1, name
    assert len((finished / "metrics.csv").read_text().splitlines()) == 1 + 2  # 64 rows / 32: the new run only
    assert json.loads((finished / RUN_FILE).read_text())["identity"]["batch_size"] == 32


def test_a_run_without_identity_and_a_damaged_checkpoint_are_refused_in_one_line(
        finished: Path, store: Path, fmnist_shards: Path, capfd: pytest.CaptureFixture[str]) -> None:
    argv = _pretrain(fmnist_shards, finished, ["--targets", str(store)])
    (finished / "checkpoint.pth").write_text("not a checkpoint\n")  # was a KeyError traceback
    before = _snapshot(finished)
    proc = tec_in_process(capfd, *argv)
    assert_one_line_error(proc)
    assert f"cannot read checkpoint {finished / 'checkpoint.pth'} (" in proc.stderr
    assert f"copy {finished / 'checkpoint-1.pth'} (the newest epoch copy) over it" in proc.stderr
    assert _snapshot(finished) == before
    (finished / RUN_FILE).unlink()
    legacy = tec_in_process(capfd, *argv)
    assert_one_line_error(legacy)
    assert "records no identity (run.json is missing)" in legacy.stderr


def test_stale_checkpoint_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    dead = os.fork()  # a PID that surely belonged to a writer that is gone
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale, live = tmp_path / f".checkpoint.pth.tmp-{dead}", tmp_path / f".checkpoint.pth.tmp-{os.getppid()}"
    for path in (stale, live, tmp_path / "config.yaml.tmp", tmp_path / "notes.txt"):
        path.write_bytes(b"half a checkpoint")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([stale.name, "config.yaml.tmp"])
    assert live.exists() and (tmp_path / "notes.txt").exists()  # a live writer's file and the user's are kept


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_from_starts_a_new_run_from_a_finished_one(fmnist_shards: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    parent, child = tmp_path / "mae", tmp_path / "control"
    base = ["mae-pretrain", "--shards", str(fmnist_shards), *MAE_ARGS, "--epochs", "2"]
    assert tec_in_process(capfd, *base, "--out", str(parent)).returncode == 0
    parent_files = _snapshot(parent)
    parent_ckpt = parent / "checkpoint.pth"
    # the old control: resuming with more epochs is now refused (the schedule would jump at the join)
    longer = tec_in_process(capfd, *base[:-1], "3", "--out", str(parent))
    assert_one_line_error(longer)
    assert "epochs: stored 2, given 3" in longer.stderr
    alone = tec_in_process(capfd, *base, "--out", str(child), "--init-optimizer")
    assert_one_line_error(alone)
    assert "give --init-from RUN/checkpoint.pth too" in alone.stderr and not child.exists()
    inside = tec_in_process(capfd, *base, "--out", str(parent), "--init-from", str(parent_ckpt), "--overwrite")
    assert_one_line_error(inside)
    assert "lies in --out" in inside.stderr
    argv = [*base, "--out", str(child), "--init-from", str(parent_ckpt), "--init-optimizer"]
    proc = tec_in_process(capfd, *argv)
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(parent) == parent_files  # the parent run is untouched
    identity = json.loads((child / RUN_FILE).read_text())
    assert identity["identity"]["init_from"] == {"sha256": _sha256(parent_ckpt), "optimizer": True}
    assert identity["notes"]["parent_path"] == str(parent_ckpt)
    ck = ckpt_io.load_checkpoint(child / "checkpoint.pth")
    assert ck["schedule"]["step"] == 4  # its own schedule: 2 epochs x 2 steps, not the parent's 4 + 4
    first_lr = float((child / "metrics.csv").read_text().splitlines()[1].split(",")[2])
    assert first_lr == 0.0  # warm-up starts again at 0
    # resuming the child with another parent (or none) is another run
    other = tec_in_process(capfd, *argv[:-3])
    assert_one_line_error(other)
    assert "init_from: stored {" in other.stderr and "given None" in other.stderr


def test_load_parent_takes_weights_and_moments_but_keeps_own_hyperparameters(tmp_path: Path) -> None:
    from tec_pipeline.train.run_dir import load_parent

    def model_and_optimizer(wd: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=wd)

    parent, opt = model_and_optimizer(0.5)
    parent(torch.ones(1, 3)).sum().backward()
    opt.step()
    payload = {"model": parent.state_dict(), "optimizer": opt.state_dict(), "schedule": {"step": 1},
               "data_position": {"epoch": 1}, "rng": []}
    torch.save(payload, tmp_path / "parent.pth")
    child, child_opt = model_and_optimizer(0.01)
    load_parent(child, child_opt, tmp_path / "parent.pth", with_optimizer=True)
    assert all(torch.equal(a, b) for a, b in zip(parent.state_dict().values(), child.state_dict().values(), strict=True))
    assert child_opt.param_groups[0]["weight_decay"] == 0.01
    moments = [s["exp_avg"] for s in child_opt.state.values()]
    assert moments and all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt.state.values(), strict=True))
