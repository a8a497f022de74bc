"""Export to timm: the file loads strictly from its own metadata and reproduces the source encoder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers import Mlp

import cli
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.convert import convert_checkpoint, load_exported
from tec_pipeline.models.vit import build_vit, resolve_arch

ARCH = resolve_arch("tec_pico_p4_16")


def _encoder() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = build_vit(ARCH).state_dict()
    return {k: torch.randn_like(v) if k.startswith("norm.") else v for k, v in state.items()}


def _mlp_token() -> Mlp:
    torch.manual_seed(7)
    return Mlp(ARCH.embed_dim, 4 * ARCH.embed_dim)


def _tec_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A TEC-student-style checkpoint with MLP CLS token, adaptor and decoder keys; returns its encoder."""
    enc = _encoder()
    model = {**enc, **{f"cls_token_mlp.{k}": v for k, v in _mlp_token().state_dict().items()},
             "adaptor.after.weight": torch.ones(ARCH.embed_dim), "mask_token": torch.zeros(1, 1, ARCH.embed_dim),
             "decoder_pos_embed": torch.zeros(1, 17, ARCH.decoder_embed_dim)}
    torch.save({"model": model, "arch": ARCH.to_dict(), "kind": "tec", "config": {}, "version": "0.1.0"}, path)
    return enc


def _views() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _unfolded_features(enc: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The TEC student's encoder on full views: cls = MLP(cls_token), then timm blocks and the final norm."""
    model = build_vit(ARCH)
    model.load_state_dict(enc)
    cls = _mlp_token()(model.cls_token).expand(len(x), -1, -1)
    h = torch.cat([cls, model.patch_embed(x)], dim=1) + model.pos_embed
    for block in model.blocks:
        h = block(h)
    return model.norm(h)


def test_converted_file_loads_strictly_from_its_metadata_and_matches_source(tmp_path: Path) -> None:
    enc = _tec_checkpoint(tmp_path / "tec.pth")
    out = convert_checkpoint(tmp_path / "tec.pth", tmp_path / "vit.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(out)))  # strict
    model.eval()
    assert torch.equal(model.norm.weight, enc["norm.weight"])  # the final norm is kept
    x = _views()
    with torch.no_grad():
        features = model.forward_features(x)
    torch.testing.assert_close(features, _unfolded_features(enc, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(load_exported(out)(x), features[:, 0], rtol=0, atol=1e-6)  # token pool
    assert json.loads(meta["tec_arch"]) == ARCH.to_dict() and len(meta["source_sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tec.pth", "vit.safetensors"]  # no temp file left


def test_source_without_norm_exports_init_norm_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = {k: v for k, v in _encoder().items() if not k.startswith("norm.")}
    torch.save({"model": enc}, tmp_path / "mae.pth")
    with caplog.at_level(logging.WARNING):
        out = convert_checkpoint(tmp_path / "mae.pth", tmp_path / "vit.safetensors", arch=ARCH.name)
    assert "norm.weight" in caplog.text
    exported = load_file(str(out))
    assert torch.equal(exported["norm.weight"], torch.ones(ARCH.embed_dim))
    assert torch.equal(exported["norm.bias"], torch.zeros(ARCH.embed_dim))
    source, _ = load_encoder(tmp_path / "mae.pth", ARCH.name)
    x = _views()
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out).forward_features(x), source.forward_features(x),
                                   rtol=0, atol=1e-6)


def test_converting_an_export_is_identity(tmp_path: Path) -> None:
    _tec_checkpoint(tmp_path / "tec.pth")
    first = load_file(str(convert_checkpoint(tmp_path / "tec.pth", tmp_path / "a.safetensors")))
    second = load_file(str(convert_checkpoint(tmp_path / "a.safetensors", tmp_path / "b.safetensors")))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cli_converts(tmp_path: Path) -> None:
    _tec_checkpoint(tmp_path / "tec.pth")
    cli.main(["convert", str(tmp_path / "tec.pth"), "--out", str(tmp_path / "out" / "vit.safetensors")])
    assert load_exported(tmp_path / "out" / "vit.safetensors").embed_dim == ARCH.embed_dim


def test_cli_replaces_an_existing_file_with_the_same_bytes_every_time(tmp_path: Path) -> None:
    # the eval JSONs record the file's sha256: two exports of one checkpoint must be the same bytes (safetensors
    # writes its metadata from a hash map, in an order that changes from process to process)
    _tec_checkpoint(tmp_path / "tec.pth")
    out = tmp_path / "vit.safetensors"
    out.write_bytes(b"an earlier export")
    exports = []
    for _ in range(4):  # each in the same process, so the hash-map order also varies here (seeded per map)
        cli.main(["convert", str(tmp_path / "tec.pth"), "--out", str(out)])
        exports.append(out.read_bytes())
    assert all(e == exports[0] for e in exports)
    header = json.loads(exports[0][8:8 + int.from_bytes(exports[0][:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert load_exported(out).embed_dim == ARCH.embed_dim


def test_cli_refuses_a_directory_as_out_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _tec_checkpoint(tmp_path / "tec.pth")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", str(tmp_path / "tec.pth"), "--out", str(tmp_path / "dir.safetensors")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "directory" in err, err


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "wrong_suffix", "no_arch"])
def test_cli_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "src.pth", tmp_path / "vit.safetensors"
    if case == "not_a_checkpoint":
        src.write_text("not a checkpoint")
    elif case == "wrong_suffix":
        _tec_checkpoint(src)
        out = tmp_path / "vit.pth"
    elif case == "no_arch":
        torch.save({"model": _encoder()}, src)
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert case != "no_arch" or "pass --arch" in err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    assert not out.exists()


def _hf_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> bool:
    a, b = model.state_dict(), expected.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_folder_loads_with_local_dir_headless_or_with_a_fresh_head(tmp_path: Path) -> None:
    from tec_pipeline.data.views import IMAGENET_MEAN
    from tec_pipeline.models.convert import convert_to_hf

    _tec_checkpoint(tmp_path / "tec.pth")
    exported = load_exported(convert_checkpoint(tmp_path / "tec.pth", tmp_path / "vit.safetensors"))
    folder = convert_to_hf(tmp_path / "tec.pth", tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tec.pth", "vit.safetensors"]  # no temp folder
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert model.num_classes == 0 and _same_weights(model, exported)  # strict: the export has no head
    assert tuple(model.pretrained_cfg["mean"]) == IMAGENET_MEAN and model.pretrained_cfg["crop_pct"] == 0.875
    x = _views()
    with torch.no_grad():
        torch.testing.assert_close(model(x), exported(x), rtol=0, atol=0)
    classifier = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=10).eval()
    assert classifier.head.out_features == 10
    encoder = {k: v for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    assert encoder.keys() == exported.state_dict().keys()
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in encoder.items())


def test_hf_folder_loads_with_pretrained_cfg_overlay(tmp_path: Path) -> None:
    from tec_pipeline.models.convert import convert_to_hf

    _tec_checkpoint(tmp_path / "tec.pth")
    folder = convert_to_hf(tmp_path / "tec.pth", tmp_path / "hf")
    config = _hf_config(folder)
    model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=0))
    assert _same_weights(model, timm.create_model(f"local-dir:{folder}", pretrained=True))


def test_hf_folder_of_a_student_named_by_its_sizes(tmp_path: Path) -> None:
    """A student timm has no name for (here 64 wide, 4 heads): config.json's architecture + model_args
    rebuild it, and this project reads the folder back as a base model."""
    from tec_pipeline.models.convert import convert_to_hf

    arch = resolve_arch("vit_p4_16px_d64_l3_h4")
    torch.manual_seed(1)
    torch.save({"model": build_vit(arch).state_dict(), "arch": arch.to_dict(), "kind": "tec", "config": {},
                "version": "0.1.0"}, tmp_path / "student.pth")
    folder = convert_to_hf(tmp_path / "student.pth", tmp_path / "hf")
    config = _hf_config(folder)
    assert config["architecture"] == arch.timm_name and config["tec"]["arch"]["name"] == arch.name
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (64, 3, 4)
    source, _ = load_encoder(tmp_path / "student.pth")
    assert _same_weights(model, source)
    again, ckpt = load_encoder(folder)
    assert ckpt.fmt == "timm-hf" and _same_weights(again, source)


def test_cli_writes_hf_folder_and_refuses_bad_targets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _tec_checkpoint(tmp_path / "tec.pth")
    cli.main(["convert", str(tmp_path / "tec.pth"), "--hf", str(tmp_path / "out" / "hf")])
    assert timm.create_model(f"local-dir:{tmp_path / 'out' / 'hf'}", pretrained=True).embed_dim == ARCH.embed_dim
    (tmp_path / "file").write_text("")
    for argv in (["--hf", str(tmp_path / "file")], [],
                 ["--hf", str(tmp_path / "x"), "--out", str(tmp_path / "x.safetensors")]):
        with pytest.raises(SystemExit) as info:
            cli.main(["convert", str(tmp_path / "tec.pth"), *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("Error: ") and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out", "tec.pth"]
