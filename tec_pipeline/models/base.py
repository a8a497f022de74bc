"""Base models: every supported checkpoint format mapped to one timm ViT encoder state dict.

Like timm's `checkpoint_filter_fn`, one function (`read_encoder_checkpoint`) knows all formats:

| format          | how it is recognised                          | what is taken                                   |
|-----------------|-----------------------------------------------|-------------------------------------------------|
| `tec` / `mae`   | ours: {'model', 'arch', 'kind', ...}          | encoder keys; `cls_token_mlp` folded into CLS    |
| `mae-release`   | {'model': ...} (facebookresearch/mae release) | as is (encoder-only keys)                        |
| `ibot-backbone` | {'state_dict': ...} (iBOT extract_backbone)   | as is                                            |
| `teacher`       | {'teacher': ..., 'student': ...} (iBOT/DINO)  | the TEACHER, `module.`/`backbone.` stripped, heads dropped |
| `student`       | {'student': ...} only                         | the student, with a warning                      |
| `safetensors`   | file suffix `.safetensors`                    | as is; arch from metadata (see models/convert.py) |
| `timm-hf`       | a folder with `model.safetensors` + `config.json` (timm's Hugging Face layout) | as is; arch from config.json |
| `dinov2`        | flat, with DINOv2 torch.hub names (`mask_token`, `register_tokens`, `ls1.gamma`) | timm's own DINOv2 conversion |
| `timm`          | a flat mapping of tensors                     | as is                                            |

The architecture comes from the checkpoint where it records one, else from an explicit name (a preset or any
timm ViT name); `input_size` then sets the size the model runs at. Every state dict goes through timm's own
`checkpoint_filter_fn` (DINOv2/CLIP key names, DeiT III `gamma_`, `pos_embed` resampled with
`resample_abs_pos_embed` to the grid used), then is checked strictly against the timm model: only allow-listed
keys may be missing or extra, and every shape must match — a wrong file is refused with the offending keys,
never silently half-loaded. A patch size that differs from the file's is refused, not resampled.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from tec_pipeline.config import require
from tec_pipeline.data.shards import file_sha256  # noqa: F401 - re-exported: checkpoints are hashed alike
from tec_pipeline.errors import UserError
from tec_pipeline.models.vit import (
    ViTArch,
    arch_from_timm,
    at_input_size,
    build_vit,
    fold_mlp_cls_token,
    resolve_arch,
    unsupported_features,
)

log = logging.getLogger(__name__)

# Top-level names of a timm ViT encoder; our own checkpoints keep only these (adaptors/decoders are dropped).
ENCODER_ROOTS = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
# May be absent from a checkpoint: the base model never applies the final norm, and no head is built.
ALLOWED_MISSING = ("norm.", "head.", "fc_norm.")
# May be present and are ignored: classifier heads, iBOT's masked_embed, MAE's decoder and mask token.
ALLOWED_UNEXPECTED = ("head.", "fc_norm.", "masked_embed", "mask_token", "decoder")
# Harmless plain-data classes found in real iBOT/DINO/MAE checkpoints ('args'); nothing else is unpickled.
SAFE_GLOBALS = [argparse.Namespace]
_ENCODER_ARCH_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
HF_WEIGHTS, HF_CONFIG = "model.safetensors", "config.json"
# timm config.json model_args that describe the head, not the encoder (the base model is built headless)
_HF_HEAD_ARGS = ("num_classes", "global_pool", "in_chans")
_MAX_LISTED = 4


@dataclass(frozen=True)
class EncoderCheckpoint:
    """An encoder state dict in timm key names, checked against `arch` (only model keys, matching shapes)."""

    state_dict: dict[str, torch.Tensor]
    arch: ViTArch
    fmt: str
    sha256: str
    path: str


def _load_torch(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found or "Weights only load failed" in str(e):
            what = found.group(1) if found else "a non-tensor object"
            raise UserError(
                f"refusing {path}: it holds a pickled object ({what}) that could run code when loaded; "
                "only plain tensor checkpoints are accepted (save a state dict, or use safetensors)"
            ) from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint (torch.load: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None


def _arch_from_metadata(meta: Mapping[str, str], path: Path, arch_flag: str) -> ViTArch | None:
    """Our safetensors record `tec_arch`; plain timm exports may record `timm_name` + `timm_kwargs`."""
    try:
        if "tec_arch" in meta:
            return ViTArch.from_dict(json.loads(meta["tec_arch"]))
        if "timm_name" in meta:
            return arch_from_timm(meta["timm_name"], **json.loads(meta.get("timm_kwargs", "{}")))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: unreadable architecture metadata ({e}); pass {arch_flag} instead") from None
    return None


def _arch_from_hf_config(path: Path) -> ViTArch:
    """timm's Hugging Face layout: config.json names the timm `architecture` and its `model_args`."""
    try:
        config = json.loads((path / HF_CONFIG).read_text())
        args = {k: v for k, v in config.get("model_args", {}).items() if k not in _HF_HEAD_ARGS}
        if isinstance(args.get("img_size"), list):  # timm writes [H, W]; this project runs square inputs
            height, width = args["img_size"]
            require(height == width, f"{path}: non-square img_size {args['img_size']} is not supported")
            args["img_size"] = height
        return arch_from_timm(config["architecture"], **args)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path / HF_CONFIG}: not a usable timm config ({_first_line(e)})") from None


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DDP's `module.` and MultiCropWrapper's `backbone.`; keys outside the backbone (heads) are dropped."""
    unwrapped = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if not any(k.startswith("backbone.") for k in unwrapped):
        return unwrapped
    heads = sorted(k for k in unwrapped if not k.startswith("backbone."))
    if heads:
        log.info("dropping %d projection-head keys (e.g. %s)", len(heads), ", ".join(heads[:_MAX_LISTED]))
    return {k.removeprefix("backbone."): v for k, v in unwrapped.items() if k.startswith("backbone.")}


def _own_checkpoint(obj: Mapping[str, Any], path: Path) -> tuple[dict[str, Any], str, ViTArch]:
    """Our MAE/TEC run: encoder keys only, the TEC student's MLP CLS token folded into `cls_token`."""
    if not isinstance(obj["model"], Mapping):
        raise UserError(f"{path}: 'model' is a {type(obj['model']).__name__}, not a state dict")
    folded = fold_mlp_cls_token(_strip_wrappers(obj["model"]))
    encoder = {k: v for k, v in folded.items() if k.split(".")[0] in ENCODER_ROOTS}
    log.debug("dropped %d adaptor/decoder keys of a %s checkpoint", len(folded) - len(encoder), obj["kind"])
    try:
        arch = ViTArch.from_dict(dict(obj["arch"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: recorded 'arch' is incomplete ({e})") from None
    return encoder, str(obj["kind"]), arch


def _select_state_dict(obj: Any, path: Path) -> tuple[Mapping[str, Any], str, ViTArch | None]:
    """(raw state dict, format name, recorded arch or None) for a torch.load'ed object."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    if "model" in obj and "arch" in obj and obj.get("kind") in ("tec", "mae"):
        return _own_checkpoint(obj, path)
    for key, fmt in (("model", "mae-release"), ("state_dict", "ibot-backbone"), ("teacher", "teacher")):
        if key in obj:
            return obj[key], fmt, None
    if "student" in obj:
        log.warning("%s has a 'student' but no 'teacher' entry: loading the student as the base model", path)
        return obj["student"], "student", None
    if "register_tokens" in obj or ("mask_token" in obj and any(k.endswith(".ls1.gamma") for k in obj)):
        return obj, "dinov2", None
    return obj, "timm", None


def _read_raw(path: Path, arch_flag: str) -> tuple[Mapping[str, Any], str, ViTArch | None]:
    """(raw state dict, format, recorded arch or None) of a file, an HF-layout folder or a safetensors file."""
    if path.is_dir():
        if not (path / HF_WEIGHTS).is_file() or not (path / HF_CONFIG).is_file():
            raise UserError(f"{path} is a folder without {HF_WEIGHTS} and {HF_CONFIG} (timm's Hugging Face layout)")
        raw, _ = _load_safetensors(path / HF_WEIGHTS)
        return raw, "timm-hf", _arch_from_hf_config(path)
    if not path.is_file():
        raise UserError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        raw, meta = _load_safetensors(path)
        return raw, "safetensors", _arch_from_metadata(meta, path, arch_flag)
    return _select_state_dict(_load_torch(path), path)


def _resolve_arch(recorded: ViTArch | None, arch: str | ViTArch | None, path: Path, arch_flag: str,
                  input_size: int | None) -> ViTArch:
    """The checkpoint's own record, else the explicit one; then run at `input_size` (None: as resolved)."""
    explicit = None
    if isinstance(arch, ViTArch):
        explicit = arch
    elif arch is not None:
        try:
            explicit = resolve_arch(arch)
        except ValueError as e:
            raise UserError(str(e)) from None
    if recorded is None and explicit is None:
        raise UserError(f"{path} records no architecture: pass {arch_flag} (a preset or timm ViT name, e.g. "
                        "vit_base_patch16_224 or vit_small_patch14_reg4_dinov2)")
    if recorded is not None and explicit is not None:
        differs = [f for f in _ENCODER_ARCH_FIELDS if getattr(explicit, f) != getattr(recorded, f)]
        if differs:  # the checkpoint's own record wins (design §3.3); the explicit name is only a fallback
            log.warning("ignoring %s %s: %s records %s (differs in %s)", arch_flag, explicit.name, path,
                        recorded.name, ", ".join(differs))
    resolved = recorded or explicit
    assert resolved is not None
    try:
        return at_input_size(resolved, input_size)
    except ValueError as e:
        raise UserError(str(e)) from None


def _weights_grid(state_dict: Mapping[str, Any], arch: ViTArch) -> int | None:
    """Side of the patch grid the checkpoint's pos_embed was trained at (None: no square grid found).

    Its rows are the grid plus the CLS row, the registers (DINOv2 hub files keep theirs out of pos_embed) or none.
    """
    pos = state_dict.get("pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3:
        return None
    for prefix in dict.fromkeys((0 if arch.no_embed_class else arch.num_prefix_tokens, 1, 0)):
        side = int(round((pos.shape[1] - prefix) ** 0.5))
        if side > 0 and side * side == pos.shape[1] - prefix:
            return side
    return None


def _timm_filtered(state_dict: dict[str, Any], arch: ViTArch, path: Path, arch_flag: str) -> dict[str, Any]:
    """timm's `checkpoint_filter_fn` on a meta model of `arch`: foreign names mapped, pos_embed resampled.

    A different patch size is refused first: timm would resample the patch kernel, which changes the model.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    weight = state_dict.get("patch_embed.proj.weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and tuple(weight.shape[-2:]) != (arch.patch_size,) * 2:
        raise UserError(f"{path} has {weight.shape[-1]}-pixel patches, the architecture {arch.name} has "
                        f"{arch.patch_size} (wrong file or wrong {arch_flag}?)")
    with torch.device("meta"):  # init=False: no init on meta tensors (slow, and it would import torch._dynamo)
        model = build_vit(arch, init=False)
    pos = state_dict.get("pos_embed")
    if isinstance(pos, torch.Tensor) and pos.shape != model.pos_embed.shape and _weights_grid(state_dict, arch) is None:
        raise UserError(f"{path}: pos_embed {tuple(pos.shape)} is no square patch grid that timm could resample to "
                        f"the model's {tuple(model.pos_embed.shape)} (wrong file or wrong {arch_flag}?)")
    problems = unsupported_features(model)
    if problems:
        raise UserError(f"{arch.name} is not supported as a base model or encoder: {'; '.join(problems)}")
    # timm's filter also resamples a pos_embed whose grid differs (bicubic, antialias: timm's defaults)
    return checkpoint_filter_fn(dict(state_dict), model, adapt_layer_scale=True)


def _listing(keys: list[str], shapes: Mapping[str, Any]) -> str:
    shown = [f"{k} {tuple(shapes[k].shape)}" for k in keys[:_MAX_LISTED]]
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def check_encoder_keys(state_dict: Mapping[str, Any], expected: Mapping[str, torch.Tensor],
                       path: str | os.PathLike[str], arch_flag: str = "--base-arch") -> dict[str, torch.Tensor]:
    """The keys of `state_dict` that the model has, after refusing any non-allow-listed difference.

    expected: the model's own state dict (only names and shapes are read).
    Raises UserError naming the missing, unexpected or wrongly shaped keys (a few of each).
    """
    bad_values = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if bad_values:
        raise UserError(f"{path}: not a state dict, non-tensor entries {', '.join(bad_values[:_MAX_LISTED])}")
    missing = sorted(k for k in expected if k not in state_dict and not k.startswith(ALLOWED_MISSING))
    unexpected = sorted(k for k in state_dict if k not in expected and not k.startswith(ALLOWED_UNEXPECTED))
    wrong = sorted(k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing, expected)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected, state_dict)}")
    if wrong:
        shown = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in wrong[:_MAX_LISTED]]
        problems.append("shape mismatch " + ", ".join(shown) + (" ..." if len(wrong) > _MAX_LISTED else ""))
    if problems:
        raise UserError(f"{path} does not fit the architecture: {'; '.join(problems)} "
                        f"(wrong file or wrong {arch_flag}?)")
    return {k: v for k, v in state_dict.items() if k in expected}


RANDOM_PREFIX = "random:"


def random_encoder(spec: str, input_size: int | None = None) -> EncoderCheckpoint:
    """`random:ARCH[@SEED]`: a randomly initialised encoder (timm init, seed 0 by default), the floor that
    every pretrained encoder should beat; its 'sha256' identifies the spec."""
    name, _, seed = spec.removeprefix(RANDOM_PREFIX).partition("@")
    require(seed == "" or seed.isdigit(), f"{spec}: the seed after @ must be an integer")
    try:
        arch = resolve_arch(name, input_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    with torch.random.fork_rng():  # a baseline must not disturb the caller's random stream
        torch.manual_seed(int(seed or 0))
        state_dict = build_vit(arch).state_dict()
    return EncoderCheckpoint(state_dict, arch, "random", hashlib.sha256(spec.encode()).hexdigest(), spec)


def read_encoder_checkpoint(path: str | os.PathLike[str], arch: str | ViTArch | None = None,
                            arch_flag: str = "--base-arch", input_size: int | None = None) -> EncoderCheckpoint:
    """Read any supported checkpoint format as a checked timm ViT encoder state dict (see module docstring).

    arch: a preset or timm ViT name (or a ViTArch), used when the checkpoint records no architecture.
    arch_flag: the command-line flag that sets `arch`, named in error messages.
    input_size: the input size to run at (pos_embed resampled by timm); None: the architecture's own.
    """
    if str(path).startswith(RANDOM_PREFIX):
        return random_encoder(str(path), input_size)
    path = Path(path)
    raw, fmt, recorded = _read_raw(path, arch_flag)
    if not isinstance(raw, Mapping):
        raise UserError(f"{path}: the '{fmt}' entry is a {type(raw).__name__}, not a state dict")
    resolved = _resolve_arch(recorded, arch, path, arch_flag, input_size)
    raw = _strip_wrappers(raw)
    resolved = dataclasses.replace(resolved, source_grid=_weights_grid(raw, resolved) or resolved.source_grid)
    mapped = _timm_filtered(raw, resolved, path, arch_flag)
    with torch.device("meta"):  # names and shapes only: no memory, and no initialisation to run
        expected = build_vit(resolved, init=False).state_dict()
    state_dict = check_encoder_keys(mapped, expected, path, arch_flag)
    grid = f", pos_embed resampled {resolved.source_grid}² -> {resolved.grid_size}²" if resolved.source_grid else ""
    log.info("base model %s: format %s, arch %s at %d px%s", path, fmt, resolved.name, resolved.img_size, grid)
    digest = sha256_of_folder(path) if path.is_dir() else file_sha256(path)
    return EncoderCheckpoint(state_dict, resolved, fmt, digest, str(path))


def sha256_of_folder(path: Path) -> str:
    """Identity of an HF-layout folder: sha256 over its weights' and config's own hashes."""
    parts = [f"{name}:{file_sha256(path / name)}" for name in (HF_WEIGHTS, HF_CONFIG)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_encoder(path: str | os.PathLike[str], arch: str | ViTArch | None = None,
                 arch_flag: str = "--base-arch", input_size: int | None = None,
                 ) -> tuple[VisionTransformer, EncoderCheckpoint]:
    """A frozen timm ViT (num_classes=0, eval(), requires_grad False) with the checkpoint's weights.

    Keys the checkpoint lacks (only allow-listed ones: the final norm) keep timm's initialisation.
    """
    ckpt = read_encoder_checkpoint(path, arch, arch_flag, input_size)
    # the checkpoint's weights replace timm's initialisation, so none is run; the only keys it may lack (the
    # final norm) are set by LayerNorm's constructor either way
    with torch.random.fork_rng():  # loading a model must not shift the caller's random stream
        model = build_vit(ckpt.arch, init=False)
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    # read_encoder_checkpoint already refused anything else; this guards the check itself.
    assert not result.unexpected_keys and all(k.startswith(ALLOWED_MISSING) for k in result.missing_keys)
    if result.missing_keys:
        log.info("checkpoint has no %s: kept timm's initialisation (unused by the targets)",
                 ", ".join(result.missing_keys))
    model.eval().requires_grad_(False)
    return model, ckpt
