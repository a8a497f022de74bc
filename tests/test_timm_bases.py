"""Any timm ViT as base model: DINOv2 hub (registers, layer scale, /14), ViT-B-shaped with qk-norm (timm HF
layout), DeiT III (layer scale, no_embed_class; plain timm state dict), at native and other input sizes.

Targets must equal timm's own forward_intermediates (features) and the last block's q·kᵀ·scale by hand
(attention), computed on an independent timm model that resamples pos_embed itself (dynamic_img_size).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors import safe_open
from timm.models import save_for_hf

from tec_pipeline.errors import UserError
from tec_pipeline.models.base import load_encoder, read_encoder_checkpoint
from tec_pipeline.models.convert import convert_checkpoint
from tec_pipeline.models.targets import full_attention_targets, stored_targets
from tec_pipeline.models.vit import arch_from_timm, resolve_arch
from tests.timm_bases import (
    TINY_DINOV2,
    dynamic_twin,
    random_timm,
    reference_targets,
    save_dinov2_hub,
)

QK_NORM_ARGS = {"img_size": 64, "embed_dim": 64, "depth": 3, "num_heads": 4, "qk_norm": True}  # ViT-B/16 shape
DEIT3_ARGS = {"img_size": 48, "embed_dim": 64, "depth": 3, "num_heads": 2}
DINOV2_ARGS = {"img_size": 42, "embed_dim": 48, "depth": 3, "num_heads": 2}


def _dinov2(tmp: Path) -> tuple[Path, str, dict[str, Any]]:
    return save_dinov2_hub(random_timm(TINY_DINOV2), tmp / "dinov2.pth"), TINY_DINOV2, {}


def _dinov2_plain_hub(tmp: Path) -> tuple[Path, str, dict[str, Any]]:
    """DINOv2 without registers: hub keys are timm's (CLS row inside pos_embed) plus the unused mask_token."""
    model = random_timm("vit_small_patch14_dinov2", **DINOV2_ARGS)
    torch.save({**model.state_dict(), "mask_token": torch.zeros(1, model.embed_dim)}, tmp / "dinov2_noreg.pth")
    return tmp / "dinov2_noreg.pth", "vit_small_patch14_dinov2", DINOV2_ARGS


def _qk_norm_hf(tmp: Path) -> tuple[Path, str, dict[str, Any]]:
    model = random_timm("vit_base_patch16_224", **QK_NORM_ARGS)
    save_for_hf(model, str(tmp / "hf"), model_args=QK_NORM_ARGS, safe_serialization=True)
    return tmp / "hf", "vit_base_patch16_224", QK_NORM_ARGS


def _deit3(tmp: Path) -> tuple[Path, str, dict[str, Any]]:
    model = random_timm("deit3_small_patch16_224", **DEIT3_ARGS)
    torch.save(model.state_dict(), tmp / "deit3.pth")
    return tmp / "deit3.pth", "deit3_small_patch16_224", DEIT3_ARGS


# name -> (writer, input size to run at, arch given on the command line or None when the file records one)
CASES: dict[str, tuple[Callable[[Path], tuple[Path, str, dict[str, Any]]], int, bool]] = {
    "dinov2_hub_registers_at_56px": (_dinov2, 56, True),
    "dinov2_hub_no_registers_at_70px": (_dinov2_plain_hub, 70, True),
    "vit_base_shape_qk_norm_hf_layout": (_qk_norm_hf, 64, False),
    "deit3_at_64px": (_deit3, 64, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_targets_equal_timm_forward_intermediates_and_hand_logits(case: str, tmp_path: Path) -> None:
    write, size, needs_arch = CASES[case]
    path, name, kwargs = write(tmp_path)
    arch = arch_from_timm(name, **kwargs) if needs_arch else None
    model, ckpt = load_encoder(path, arch, input_size=size)
    native = kwargs.get("img_size", 42) // ckpt.arch.patch_size
    assert ckpt.arch.img_size == size and ckpt.arch.to_dict()["source_grid"] == native
    twin = dynamic_twin(random_timm(name, **kwargs), name, **kwargs)  # the same random weights, timm's own resampling
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    k = 5
    got, want = stored_targets(model, x, k, 2), reference_targets(twin, x, k, 2)
    assert got["attention"].shape == (3, 1 + k, ckpt.arch.num_heads, ckpt.arch.num_patches)
    assert torch.equal(got["topk_index"], want["topk_index"])
    torch.testing.assert_close(got["features"], want["features"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["attention"], want["attention"], rtol=0, atol=1e-5)
    full = full_attention_targets(model, x, k, 2)  # the full-matrix reference agrees too
    assert torch.equal(full["topk_index"], got["topk_index"])
    torch.testing.assert_close(full["attention"], got["attention"], rtol=0, atol=1e-5)


def test_formats_are_named(tmp_path: Path) -> None:
    for write in (_dinov2, _dinov2_plain_hub):
        path, name, kwargs = write(tmp_path)
        assert read_encoder_checkpoint(path, arch_from_timm(name, **kwargs)).fmt == "dinov2"
    hf, _, _ = _qk_norm_hf(tmp_path)
    ckpt = read_encoder_checkpoint(hf)  # the architecture comes from config.json
    assert ckpt.fmt == "timm-hf" and ckpt.arch.qk_norm and ckpt.arch.embed_dim == 64


def test_converted_base_model_loads_strictly_in_timm_with_its_own_variant(tmp_path: Path) -> None:
    path, name, _ = _dinov2(tmp_path)
    out = convert_checkpoint(path, tmp_path / "dinov2.safetensors", name, input_size=56)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    exported = timm.create_model(meta["timm_name"], num_classes=0, checkpoint_path=str(out),
                                 **json.loads(meta["timm_kwargs"])).eval()  # strict
    model, _ = load_encoder(path, name, input_size=56)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(exported.forward_features(x), model.forward_features(x), rtol=0, atol=1e-5)


def test_registers_without_cls_token_are_refused(tmp_path: Path) -> None:
    model = timm.create_model("vit_medium_patch16_reg4_gap_256", pretrained=False, num_classes=0, img_size=32,
                              embed_dim=32, depth=2, num_heads=2)
    save_for_hf(model, str(tmp_path / "gap"), model_args={"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2},
                safe_serialization=True)
    with pytest.raises(UserError, match=r"no CLS token \(4 registers\)"):
        read_encoder_checkpoint(tmp_path / "gap")
    with pytest.raises(ValueError, match="it is a ResNet, not a timm VisionTransformer"):
        resolve_arch("resnet18")


def test_input_size_must_be_a_multiple_of_the_patch(tmp_path: Path) -> None:
    path, name, _ = _dinov2(tmp_path)
    with pytest.raises(UserError, match="not a multiple of .* patch size 14"):
        read_encoder_checkpoint(path, name, input_size=50)
