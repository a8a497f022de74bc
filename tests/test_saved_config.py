"""RUN/config.yaml re-runs the same job (issue 17): it records resolved values (the architecture built, not
`model: null`), and `tec COMMAND --config RUN/config.yaml` is the same run, so it resumes rather than being
refused, and finishes with the weights of an uninterrupted run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tec_pipeline.stage1 import CacheConfig, cache_targets
from tests.conftest import needs_fashion_mnist, tec_in_process

pytestmark = needs_fashion_mnist
TRAIN = ("--epochs", "2", "--batch-size", "32", "--warmup-epochs", "0.5")


@pytest.fixture(scope="module")
def store(fmnist_shards: Path, pico_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("saved_config") / "store.zarr"
    cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(out), views=1, topk=4,
                              chunk_rows=64, codec="fp32", loader_workers=0, limit=64))
    return out


def _argv(command: str, run: Path, shards: Path, base: Path, store: Path) -> list[str]:
    """A small job of `command` that leaves every input-dependent setting at its default."""
    if command == "pretrain":
        return ["pretrain", "--targets", str(store), "--shards", str(shards), "--out", str(run), "--limit", "64",
                "--allow-partial", "--deterministic", *TRAIN]
    if command == "mae-pretrain":
        return ["mae-pretrain", "--shards", str(shards), "--out", str(run), "--model", "tec_pico_p4_16",
                "--limit", "64", "--deterministic", *TRAIN]
    return ["finetune", "--checkpoint", str(base), "--train-shards", str(shards), "--test-shards", str(shards),
            "--out", str(run), "--limit-train", "64", "--limit-test", "32", "--aa", "", "--reprob", "0", *TRAIN]


# settings whose default depends on the inputs: the saved config names what they resolved to
RESOLVED = {
    "pretrain": {"model": "tec_pico_p4_16", "input_size": 16, "decoder_depth": 2, "decoder_dim": 32,
                 "decoder_heads": 2, "decoder_mlp_ratio": 4.0, "topk": 4, "views": 1, "view_seed": 0},
    "mae-pretrain": {"model": "tec_pico_p4_16", "decoder_depth": 4},
    "finetune": {"arch": "tec_pico_p4_16", "input_size": 16},
}


@pytest.mark.parametrize("command", sorted(RESOLVED))
def test_rerun_from_saved_config_resumes_the_same_run(command: str, fmnist_shards: Path, pico_base: Path,
                                                      store: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    first = tec_in_process(capfd, *_argv(command, run, fmnist_shards, pico_base, store))
    assert first.returncode == 0, first.stderr
    saved = (run / "config.yaml").read_text()
    config = yaml.safe_load(saved)
    assert {key: config[key] for key in RESOLVED[command]} == RESOLVED[command]
    finished = torch.load(run / "checkpoint.pth", weights_only=True)["model"]
    shutil.copy(run / "checkpoint-0.pth", run / "checkpoint.pth")  # as if killed after epoch 0

    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = tec_in_process(capfd, command, "--config", str(run / "config.yaml"))
    assert again.returncode == 0, again.stderr
    assert "resuming at epoch 1, micro-batch 0" in caplog.text  # it continued the run, it did not start over
    assert (run / "config.yaml").read_text() == saved  # the same resolved config
    resumed = torch.load(run / "checkpoint.pth", weights_only=True)["model"]
    assert resumed.keys() == finished.keys() and all(torch.equal(resumed[k], finished[k]) for k in finished)


@pytest.mark.parametrize("source", ["vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2", "tec_pico_p4_16@20"])
def test_a_student_named_by_its_sizes_resolves_back_to_itself(source: str) -> None:
    """The saved `model` of a student sized after a non-plain ViT (or run at another input size) is a name of
    `plain_name`'s form; --model takes it back."""
    import dataclasses

    from tec_pipeline.models.vit import at_input_size, plain_arch, resolve_arch

    name, _, size = source.partition("@")
    student = plain_arch(at_input_size(resolve_arch(name), int(size) if size else None))
    assert student.name.startswith("vit_p") and student.name != name
    again = plain_arch(resolve_arch(student.name))
    decoder = ("decoder_embed_dim", "decoder_num_heads")  # the saved config records the decoder apart
    assert dataclasses.replace(again, **{k: getattr(student, k) for k in decoder}) == student
