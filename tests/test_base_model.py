"""Base-model loading: every checkpoint format round-trips into a timm ViT; bad files are refused in one line."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import Mlp

from tec_pipeline.errors import UserError
from tec_pipeline.models.base import file_sha256, load_encoder, read_encoder_checkpoint
from tec_pipeline.models.vit import build_vit, resolve_arch

ARCH = resolve_arch("tec_pico_p4_16")
State = dict[str, torch.Tensor]


def _encoder(seed: int) -> State:
    """A random pico ViT encoder state dict (timm names), norm weights not at their init values."""
    torch.manual_seed(seed)
    state = build_vit(ARCH).state_dict()
    return {k: torch.randn_like(v) if k.startswith("norm.") else v.clone() for k, v in state.items()}


def _heads(prefix: str) -> State:
    """iBOT/DINO projection-head keys (not part of the backbone)."""
    return {f"{prefix}head.mlp.0.weight": torch.randn(64, ARCH.embed_dim),
            f"{prefix}head.last_layer.weight_g": torch.randn(128, 1)}


def _mlp_token() -> Mlp:
    torch.manual_seed(7)
    return Mlp(ARCH.embed_dim, 4 * ARCH.embed_dim)


def _ours(kind: str) -> Callable[[State], dict]:
    def build(enc: State) -> dict:
        model = dict(enc)
        if kind == "tec":  # the TEC student's MLP-enhanced CLS token
            model.update({f"cls_token_mlp.{k}": v for k, v in _mlp_token().state_dict().items()})
        model.update({"mask_token": torch.zeros(1, 1, ARCH.embed_dim),
                      "decoder_blocks.0.attn.qkv.weight": torch.randn(96, ARCH.decoder_embed_dim),
                      "adaptor.before.weight": torch.randn(ARCH.depth * ARCH.embed_dim)})
        return {"model": model, "arch": ARCH.to_dict(), "kind": kind, "config": {"epochs": 1}, "version": "0.1.0",
                "optimizer": {"state": {}, "param_groups": []}, "data_position": {"epoch": 0, "step": 3}}
    return build


# name → (builder from the teacher encoder, needs --arch, format reported)
FORMATS: dict[str, tuple[Callable[[State], object], bool, str]] = {
    "mae_release": (lambda enc: {"model": enc}, True, "mae-release"),
    "ibot_backbone": (lambda enc: {"state_dict": {**enc, "masked_embed": torch.zeros(1, ARCH.embed_dim)}},
                      True, "ibot-backbone"),
    "ibot_full": (lambda enc: {
        "teacher": {**{f"backbone.{k}": v for k, v in enc.items()}, **_heads("")},
        "student": {**{f"module.backbone.{k}": v for k, v in _encoder(99).items()}, **_heads("module.")},
        "args": argparse.Namespace(arch="vit_base", lr=5e-4), "epoch": 100}, True, "teacher"),
    "dino_full": (lambda enc: {
        "teacher": {**{f"module.backbone.{k}": v for k, v in enc.items()}, **_heads("module.")},
        "student": {f"module.backbone.{k}": v for k, v in _encoder(99).items()}}, True, "teacher"),
    "timm": (lambda enc: {**enc, "head.weight": torch.randn(10, ARCH.embed_dim), "head.bias": torch.zeros(10)},
             True, "timm"),
    "ours_mae": (_ours("mae"), False, "mae"),
}


def _assert_loaded(model: torch.nn.Module, enc: State, skip: tuple[str, ...] = ()) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(enc)
    for key, value in enc.items():
        if key not in skip:
            assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_round_trips(name: str, tmp_path: Path) -> None:
    build, needs_arch, fmt = FORMATS[name]
    enc = _encoder(0)
    path = tmp_path / "ckpt.pth"
    torch.save(build(enc), path)
    model, ckpt = load_encoder(path, ARCH.name if needs_arch else None)
    assert ckpt.fmt == fmt and ckpt.arch == ARCH
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_loaded(model, enc)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_full_ibot_checkpoint_takes_the_teacher_not_the_student(tmp_path: Path) -> None:
    path = tmp_path / "ibot.pth"
    torch.save(FORMATS["ibot_full"][0](_encoder(0)), path)
    model, _ = load_encoder(path, ARCH.name)
    student = _encoder(99)
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], student["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], _encoder(0)["blocks.0.attn.qkv.weight"])


def test_student_only_checkpoint_is_taken_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = _encoder(0)
    path = tmp_path / "student.pth"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in enc.items()}}, path)
    with caplog.at_level(logging.WARNING):
        model, ckpt = load_encoder(path, ARCH.name)
    assert ckpt.fmt == "student" and "no 'teacher'" in caplog.text
    _assert_loaded(model, enc)


def test_our_tec_checkpoint_records_arch_and_folds_the_mlp_cls_token(tmp_path: Path) -> None:
    enc = _encoder(0)
    path = tmp_path / "tec.pth"
    torch.save(_ours("tec")(enc), path)
    model, ckpt = load_encoder(path)  # no arch given: it is recorded in the checkpoint
    assert ckpt.fmt == "tec" and ckpt.arch == ARCH
    assert not any(k.startswith(("cls_token_mlp", "decoder", "adaptor", "mask_token")) for k in ckpt.state_dict)
    with torch.no_grad():
        expected_cls = _mlp_token()(enc["cls_token"])
    torch.testing.assert_close(model.cls_token.detach(), expected_cls, rtol=0, atol=1e-6)
    assert not torch.allclose(expected_cls, enc["cls_token"])
    _assert_loaded(model, enc, skip=("cls_token",))


def test_safetensors_arch_comes_from_metadata(tmp_path: Path) -> None:
    enc = _encoder(0)
    path = tmp_path / "vit.safetensors"
    save_file(enc, str(path), metadata={"timm_name": ARCH.timm_name, "timm_kwargs": json.dumps(ARCH.timm_kwargs())})
    model, ckpt = load_encoder(path)
    assert ckpt.fmt == "safetensors" and ckpt.arch.embed_dim == ARCH.embed_dim and ckpt.arch.img_size == 16
    _assert_loaded(model, enc)


def test_mae_release_without_norm_keeps_init_norm(tmp_path: Path) -> None:
    enc = {k: v for k, v in _encoder(0).items() if not k.startswith("norm.")}
    path = tmp_path / "mae.pth"
    torch.save({"model": enc}, path)
    model, _ = load_encoder(path, ARCH.name)
    assert torch.equal(model.norm.weight, torch.ones(ARCH.embed_dim))
    _assert_loaded(model, {**enc, "norm.weight": torch.ones(48), "norm.bias": torch.zeros(48)})


def _refusal(path: Path, arch: str | None = ARCH.name) -> str:
    with pytest.raises(UserError) as info:
        read_encoder_checkpoint(path, arch)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    enc = _encoder(0)
    enc["blocks.1.mlp.fc1.weight"] = torch.zeros(100, ARCH.embed_dim)
    torch.save({"model": enc}, tmp_path / "c.pth")
    message = _refusal(tmp_path / "c.pth")
    assert "blocks.1.mlp.fc1.weight (100, 48) vs model (192, 48)" in message
    enc = _encoder(0)
    enc["pos_embed"] = torch.zeros(1, 21, ARCH.embed_dim)  # 20 or 21 positions: no square grid to resample
    torch.save({"model": enc}, tmp_path / "c.pth")
    assert "pos_embed (1, 21, 48) is no square patch grid" in _refusal(tmp_path / "c.pth")


def test_another_grid_is_resampled_by_timm_and_recorded(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    enc = _encoder(0)
    enc["pos_embed"] = torch.randn(1, 1 + 7 * 7, ARCH.embed_dim)  # trained at 28 px, run at 16 px
    torch.save({"model": enc}, tmp_path / "c.pth")
    model, ckpt = load_encoder(tmp_path / "c.pth", ARCH.name)
    assert ckpt.arch.source_grid == 7 and ckpt.arch.grid_size == 4
    assert ckpt.arch.to_dict()["source_grid"] == 7 and ckpt.arch.to_dict()["grid_size"] == 4
    expected = resample_abs_pos_embed(enc["pos_embed"], new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)


def test_patch_size_mismatch_is_refused_not_resampled(tmp_path: Path) -> None:
    enc = _encoder(0)
    enc["patch_embed.proj.weight"] = torch.zeros(ARCH.embed_dim, 3, 2, 2)
    torch.save({"model": enc}, tmp_path / "c.pth")
    assert "has 2-pixel patches, the architecture tec_pico_p4_16 has 4" in _refusal(tmp_path / "c.pth")


def test_unknown_and_missing_keys_are_refused(tmp_path: Path) -> None:
    enc = _encoder(0)
    enc["blocks.0.attn.relative_bias"] = torch.zeros(3)
    del enc["blocks.2.mlp.fc1.weight"]
    torch.save(enc, tmp_path / "c.pth")
    message = _refusal(tmp_path / "c.pth")
    assert "unexpected keys blocks.0.attn.relative_bias (3,)" in message
    assert "missing keys blocks.2.mlp.fc1.weight" in message


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    message = _refusal(tmp_path / "evil.pth")
    assert "refusing" in message and "could run code" in message
    assert not marker.exists()


def test_missing_unreadable_and_non_checkpoint_files_are_refused(tmp_path: Path) -> None:
    assert "no such checkpoint file" in _refusal(tmp_path / "absent.pth")
    (tmp_path / "notes.pth").write_text("hello world")
    assert "not a readable PyTorch checkpoint" in _refusal(tmp_path / "notes.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 12)
    assert "not a readable safetensors file" in _refusal(tmp_path / "bad.safetensors")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert "not a checkpoint" in _refusal(tmp_path / "list.pth")


def test_arch_is_required_when_the_checkpoint_records_none(tmp_path: Path) -> None:
    torch.save({"model": _encoder(0)}, tmp_path / "mae.pth")
    assert "pass --base-arch" in _refusal(tmp_path / "mae.pth", arch=None)
    assert "unknown architecture 'vit_huge'" in _refusal(tmp_path / "mae.pth", arch="vit_huge")


def test_recorded_arch_wins_over_a_contradicting_explicit_one(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    torch.save(_ours("tec")(_encoder(0)), tmp_path / "tec.pth")
    with caplog.at_level(logging.WARNING):
        ckpt = read_encoder_checkpoint(tmp_path / "tec.pth", arch="tec_micro_p4_28")
    assert ckpt.arch == ARCH and "ignoring --base-arch tec_micro_p4_28" in caplog.text


def test_file_sha256_streams_whole_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB blocks
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_random_encoder_spec_is_a_seeded_baseline() -> None:
    from tec_pipeline.models.base import load_encoder

    state = torch.random.get_rng_state()
    a, info = load_encoder("random:tec_pico_p4_16")
    b, _ = load_encoder("random:tec_pico_p4_16@0")
    c, _ = load_encoder("random:tec_pico_p4_16@1")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert info.fmt == "random" and info.arch.name == "tec_pico_p4_16"
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    with pytest.raises(UserError, match="unknown architecture"):
        load_encoder("random:vit_gigantic")
