"""End to end on a tiny DINOv2-style base model (layer scale, /14, 4 registers) in DINOv2's torch.hub format:
make-shards → cache-targets at a non-native input size → verify --recompute → pretrain of a narrower student at
its own input size → convert → strict timm load → knn; and the refusals that must create nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from timm.models import save_for_hf

from tec_pipeline.data.shards import iter_samples, load_manifest
from tec_pipeline.data.views import ViewBox, normalize, replay_view_uint8
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import assert_one_line_error, needs_fashion_mnist, tec_in_process
from tests.timm_bases import TINY_DINOV2, dynamic_twin, random_timm, reference_targets, save_dinov2_hub

K, SIZE = 4, 56  # 56 px = 4x4 patches of 14 (the weights were made at 42 px = 3x3)
STUDENT = "tec_pico_p4_16"  # width 48 from a width-96 cache, 16 px = 4x4 patches of 4


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("timm e2e")
    return {"root": root, "train": root / "train", "test": root / "test", "store": root / "store.zarr",
            "base": save_dinov2_hub(random_timm(TINY_DINOV2), root / "dinov2_hub.pth"), "run": root / "run",
            "export": root / "student.safetensors"}


def _ok(capfd: pytest.CaptureFixture[str], *args: str) -> str:
    proc = tec_in_process(capfd, *args)
    assert proc.returncode == 0, f"tec {' '.join(args)}:\n{proc.stderr}"
    return proc.stdout


@needs_fashion_mnist
def test_dinov2_hub_chain(chain: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    _ok(capfd, "make-shards", "fashion-mnist", "--out", str(chain["train"]), "--limit", "48", "--shard-size", "24")
    _ok(capfd, "make-shards", "fashion-mnist", "--split", "test", "--out", str(chain["test"]), "--limit", "32")
    _ok(capfd, "cache-targets", "--shards", str(chain["train"]), "--base-model", str(chain["base"]),
        "--base-arch", TINY_DINOV2, "--input-size", str(SIZE), "--out", str(chain["store"]), "--views", "1",
        "--topk", str(K), "--codec", "fp32", "--chunk-rows", "24", "--batch-size", "24", "--loader-workers", "0",
        "--device", "cpu")
    store = TargetStore.open(str(chain["store"]))
    base = store.attrs["base_model"]
    assert base["input_size"] == SIZE and base["format"] == "dinov2"
    assert base["arch"]["source_grid"] == 3 and base["arch"]["grid_size"] == 4 and base["arch"]["reg_tokens"] == 4
    _check_stored_targets(store, chain["train"])
    assert "OK" in _ok(capfd, "verify", str(chain["store"]), "--shards", str(chain["train"]), "--recompute", "3")

    _ok(capfd, "pretrain", "--targets", str(chain["store"]), "--shards", str(chain["train"]), "--out", str(chain["run"]),
        "--model", STUDENT, "--epochs", "1", "--batch-size", "16", "--decoder-depth", "1", "--device", "cpu")
    ckpt = torch.load(chain["run"] / "checkpoint.pth", weights_only=True)
    weights = ckpt["model"]
    assert weights["blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)  # the student's own width
    assert weights["forward_fea_decoder.decoder_pred.weight"].shape[0] == 96  # the base model's D
    assert weights["forward_att_decoder.decoder_qk.weight"].shape[0] == 2 * 96
    assert ckpt["prediction"] == {"dim": 96, "heads": 3} and "decoder_blocks.1.norm1.weight" not in weights

    _ok(capfd, "convert", str(chain["run"] / "checkpoint.pth"), "--out", str(chain["export"]))
    with safe_open(str(chain["export"]), framework="pt") as f:
        meta = f.metadata()
    assert meta["timm_name"] != TINY_DINOV2 and json.loads(meta["tec_arch"])["name"] == STUDENT
    exported = timm.create_model(meta["timm_name"], num_classes=0, checkpoint_path=str(chain["export"]),
                                 **json.loads(meta["timm_kwargs"]))  # strict
    assert exported.embed_dim == 48 and exported.reg_token is None
    out = _ok(capfd, "knn", "--checkpoint", str(chain["export"]), "--train-shards", str(chain["train"]),
              "--test-shards", str(chain["test"]), "--json", str(chain["root"] / "knn.json"))
    assert "top-1" in out and json.loads((chain["root"] / "knn.json").read_text())["n_test"] == 32


def _check_stored_targets(store: TargetStore, shards: Path) -> None:
    """Stored rows equal timm's forward_intermediates and the hand logits of a timm model resampling on the fly."""
    twin = dynamic_twin(random_timm(TINY_DINOV2), TINY_DINOV2)
    manifest = load_manifest(shards)
    for row in (0, 17, 40):
        stored = store.read_rows(0, row, row + 1)
        image = next(iter(iter_samples(str(shards), row, row + 1, manifest))).image
        x = normalize(replay_view_uint8(image, ViewBox.from_array(stored["boxes"][0]), SIZE)).unsqueeze(0)
        want = reference_targets(twin, x, K, 2)
        assert (stored["topk_index"][0] == want["topk_index"][0].numpy()).all()
        torch.testing.assert_close(torch.from_numpy(stored["features"][0]), want["features"][0], rtol=0, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(stored["attention"][0]), want["attention"][0], rtol=0, atol=1e-4)


@needs_fashion_mnist
def test_refusals_create_nothing(chain: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    if not chain["store"].exists():
        pytest.skip("needs the store of test_dinov2_hub_chain")
    run = chain["root"] / "grid mismatch run"
    proc = tec_in_process(capfd, "pretrain", "--targets", str(chain["store"]), "--shards", str(chain["train"]),
                          "--out", str(run), "--model", "tec_micro_p4_28", "--epochs", "1", "--device", "cpu")
    assert_one_line_error(proc)
    assert "patch grid is 4x4" in proc.stderr and "7x7" in proc.stderr and not run.exists()

    model = timm.create_model("vit_medium_patch16_reg4_gap_256", pretrained=False, num_classes=0, img_size=32,
                              embed_dim=32, depth=2, num_heads=2)
    save_for_hf(model, str(chain["root"] / "gap"), safe_serialization=True,
                model_args={"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2})
    out = chain["root"] / "refused.zarr"
    proc = tec_in_process(capfd, "cache-targets", "--shards", str(chain["train"]), "--base-model",
                          str(chain["root"] / "gap"), "--out", str(out), "--device", "cpu")
    assert_one_line_error(proc)
    assert "no CLS token (4 registers)" in proc.stderr and not out.exists()


@needs_fashion_mnist
def test_online_mode_takes_the_same_base_model(chain: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    """Online training with the DINOv2 hub file at 56 px; the default student is a plain ViT of its sizes."""
    if not chain["train"].exists():
        pytest.skip("needs the shards of test_dinov2_hub_chain")
    run = chain["root"] / "online run"
    _ok(capfd, "pretrain", "--base-model", str(chain["base"]), "--base-arch", TINY_DINOV2, "--input-size", str(SIZE),
        "--shards", str(chain["train"]), "--out", str(run), "--topk", str(K), "--epochs", "1", "--batch-size", "16",
        "--limit", "32", "--device", "cpu")
    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["arch"]["img_size"] == SIZE and ckpt["arch"]["reg_tokens"] == 0 and ckpt["arch"]["init_values"] is None
    assert ckpt["arch"]["name"] == "vit_p14_56px_d96_l3_h3" and ckpt["prediction"] == {"dim": 96, "heads": 3}
    assert not any(".ls1." in key for key in ckpt["model"])


@needs_fashion_mnist
def test_every_evaluation_runs_on_the_base_model_and_the_student(chain: dict[str, Path],
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """linprobe on the DINOv2 hub file itself (registers, layer scale, run at 56 px); finetune on the student."""
    if not chain["export"].exists():
        pytest.skip("needs the export of test_dinov2_hub_chain")
    shards = ["--train-shards", str(chain["train"]), "--test-shards", str(chain["test"])]
    out = _ok(capfd, "linprobe", "--checkpoint", str(chain["base"]), "--arch", TINY_DINOV2, "--input-size", str(SIZE),
              *shards)
    assert f"linprobe {TINY_DINOV2}" in out
    out = _ok(capfd, "finetune", "--checkpoint", str(chain["export"]), *shards, "--out", str(chain["root"] / "ft"),
              "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0")
    assert "finetune" in out and "top-1" in out
