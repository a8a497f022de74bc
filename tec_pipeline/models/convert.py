"""Export any supported checkpoint (TEC student, MAE, base-model formats) as plain timm ViT weights.

Unlike the reference `weight_convert.py` (tec-method.md §7), the final `norm` is kept, and the file carries
its own architecture, so it loads strictly with nothing else known:

    meta = safe_open(path, "pt").metadata()
    model = timm.create_model(meta["timm_name"], num_classes=0, checkpoint_path=path, **json.loads(meta["timm_kwargs"]))

`timm_name` + `timm_kwargs` describe the encoder itself: for a TEC student a plain ViT of the student's sizes
(`vit.plain_arch`), never the base model's timm name; for a base model its own variant (layer scale,
registers, ...).

The MLP CLS token is folded into `cls_token` (exact: it acts on the learned token only), adaptors, decoders
and mask tokens are dropped (both done by `read_encoder_checkpoint`).

`convert_to_hf` writes the same weights in timm's Hugging Face layout (`model.safetensors` + `config.json`, by
timm's own `save_for_hf`), so `timm.create_model("local-dir:DIR", pretrained=True)` rebuilds and loads it:
config.json's `architecture` is `timm_name` and its `model_args` the sizes, which is how a student of any size
(named `tec_*` or `vit_p…px…` here, names timm does not know) is rebuilt. The export has no head
(`num_classes` 0); `num_classes=N` gives a fresh one. The pretrained_cfg describes the evaluation view this
project uses (bicubic, crop 0.875, ImageNet mean/std), not that of the timm model the sizes came from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from tec_pipeline.config import require
from tec_pipeline.data.views import EVAL_CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD
from tec_pipeline.errors import UserError
from tec_pipeline.models.base import HF_CONFIG, HF_WEIGHTS, EncoderCheckpoint, read_encoder_checkpoint
from tec_pipeline.models.vit import ViTArch, build_vit

log = logging.getLogger(__name__)


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's metadata in sorted key order, in place.

    safetensors serialises the metadata from a hash map, so its order (and the file's sha256, which evaluation
    records as `checkpoint_sha256`) changed from one export of the same checkpoint to the next. The header
    keeps its length (the same keys and values, reordered), so the tensor data is not moved."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text.rstrip()) != len(raw.rstrip()):  # another serialisation than safetensors': leave it as it is
            log.warning("%s: could not reorder its safetensors metadata; the file is correct but not reproducible",
                        path)
            return
        f.seek(8)
        f.write(text.ljust(size))


def export_metadata(arch: ViTArch, source_sha256: str) -> dict[str, str]:
    """safetensors metadata (str → str): enough to rebuild the model with timm alone, plus provenance."""
    return {
        "timm_name": arch.timm_name,
        "timm_kwargs": json.dumps(arch.timm_kwargs(), sort_keys=True),
        "tec_arch": json.dumps(arch.to_dict(), sort_keys=True),
        "source_sha256": source_sha256,
    }


def export_state_dict(ckpt: EncoderCheckpoint) -> dict[str, torch.Tensor]:
    """The full state dict of a timm ViT (num_classes=0, token pool) holding the checkpoint's encoder weights.

    Keys the source lacks (only the final norm is allowed to be absent, e.g. an MAE release without it) keep
    timm's initialisation, LayerNorm ones/zeros; that is logged.
    """
    model = build_vit(ckpt.arch)
    missing = model.load_state_dict(ckpt.state_dict, strict=False).missing_keys
    if missing:
        log.warning("%s has no %s: exported timm's initialisation (LayerNorm weight 1, bias 0) instead",
                    ckpt.path, ", ".join(missing))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def convert_checkpoint(source: str | os.PathLike[str], out: str | os.PathLike[str],
                       arch: str | None = None, input_size: int | None = None, out_flag: str = "--out") -> Path:
    """Write `source` as timm ViT safetensors at `out` (atomically: temporary file, then os.replace).

    arch: a preset or timm ViT name, needed only when the source records no architecture.
    input_size: export at this input size (pos_embed resampled by timm); None: the source's own.
    out_flag: the option that named `out`, for error messages (`tec frozen-eval --export`).
    """
    from safetensors.torch import save_file

    out = Path(out)
    require(out.suffix == ".safetensors", f"{out_flag} must be a .safetensors file, got {out}")
    require(not out.is_dir(), f"{out_flag} {out} is a directory; give a file name ending in .safetensors")
    ckpt = read_encoder_checkpoint(source, arch, arch_flag="--arch", input_size=input_size)
    state_dict = export_state_dict(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file(state_dict, str(tmp), metadata=export_metadata(ckpt.arch, ckpt.sha256))
        sort_metadata(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s: %s (%s, from %s format, sha256 %s…)", out, ckpt.arch.name, ckpt.arch.timm_name,
             ckpt.fmt, ckpt.sha256[:12])
    return out


def hf_pretrained_cfg(arch: ViTArch) -> dict[str, Any]:
    """timm pretrained_cfg of an export: how its inputs are made (`center_view_uint8` + normalisation), no head."""
    return {"architecture": arch.timm_name, "input_size": (3, arch.img_size, arch.img_size),
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": EVAL_CROP_FRACTION,
            "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 0, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head"}


def convert_to_hf(source: str | os.PathLike[str], directory: str | os.PathLike[str], arch: str | None = None,
                  input_size: int | None = None) -> Path:
    """Write `source` as timm's Hugging Face layout into `directory` (model.safetensors + config.json).

    Both files are written to a temporary folder beside `directory` first, then moved in with os.replace, so a
    failed export leaves an earlier one whole. Other files in `directory` are left alone.
    """
    from timm.models import save_for_hf

    directory = Path(directory)
    require(not directory.is_file(), f"--hf {directory} is a file; give a folder (created if missing)")
    ckpt = read_encoder_checkpoint(source, arch, arch_flag="--arch", input_size=input_size)
    model = build_vit(ckpt.arch)
    model.load_state_dict(export_state_dict(ckpt))
    model.pretrained_cfg = hf_pretrained_cfg(ckpt.arch)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    try:
        save_for_hf(model, str(tmp), safe_serialization=True,
                    model_config={"tec": {"arch": ckpt.arch.to_dict(), "source_sha256": ckpt.sha256}})
        directory.mkdir(parents=True, exist_ok=True)
        for name in (HF_WEIGHTS, HF_CONFIG):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s/{%s,%s}: %s (timm %s + model_args), from %s format, sha256 %s…", directory, HF_WEIGHTS,
             HF_CONFIG, ckpt.arch.name, ckpt.arch.timm_name, ckpt.fmt, ckpt.sha256[:12])
    return directory


def load_exported(path: str | os.PathLike[str]) -> VisionTransformer:
    """A timm ViT rebuilt from an exported file's own metadata and loaded strictly (eval mode)."""
    import timm
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    require("timm_name" in meta and "timm_kwargs" in meta, f"{path} records no timm_name/timm_kwargs metadata")
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"{path} does not match its own metadata: {str(e).splitlines()[0]}") from None
    return model.eval()
