"""ViT architectures: a string registry of size presets plus any timm VisionTransformer, built with timm, and the
fixed 2-D sin-cos embedding.

Every model in the project (base model, TEC student, MAE, exported weights) is described by one `ViTArch`, so
that a checkpoint can record its architecture as a plain dict and be rebuilt with nothing else known: the timm
model function `timm_name` with the explicit constructor arguments of `timm_kwargs()`. A timm name that is not a
preset is read off the model timm builds for it (`arch_from_timm`), so its variants (layer scale, registers,
qk-norm, `no_embed_class`, any patch size) are whatever timm makes of that name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

# The timm model function a plain ViT (no layer scale, no registers, qkv bias) is rebuilt from: every size
# argument is passed explicitly, so the function's own defaults (ViT-B/16) never show through.
PLAIN_TIMM_NAME = "vit_base_patch16_224"


@dataclass(frozen=True)
class ViTArch:
    """A ViT/patch-N (timm layout), plus the TEC/MAE decoder used with it.

    img_size: the input size the model runs at (square); patch grid = img_size // patch_size.
    init_values: layer-scale init (None: no layer scale); reg_tokens: register tokens after CLS;
    no_embed_class: pos_embed covers the patches only (DeiT III, DINOv2 with registers in timm);
    source_grid: the pos_embed grid of the weights before timm resampled it to this size (None: the same).
    """

    name: str
    timm_name: str  # timm model function that `timm.create_model` builds it from (with `timm_kwargs`)
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_num_heads: int = 16
    decoder_depth: int = 2
    decoder_mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None
    reg_tokens: int = 0
    class_token: bool = True
    no_embed_class: bool = False
    source_grid: int | None = None

    def __post_init__(self) -> None:
        if self.source_grid == self.grid_size:  # one spelling of "not resampled", so equal archs compare equal
            object.__setattr__(self, "source_grid", None)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """L, the number of patch tokens."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS (if any) then the registers."""
        return int(self.class_token) + self.reg_tokens

    @property
    def is_plain(self) -> bool:
        """A ViT that the TEC student and `PLAIN_TIMM_NAME` can be: CLS token, no layer scale, registers, qk-norm."""
        return (self.qkv_bias and not self.qk_norm and self.init_values is None and self.reg_tokens == 0
                and self.class_token and not self.no_embed_class)

    def timm_kwargs(self) -> dict[str, Any]:
        """Constructor arguments that make `timm.create_model(timm_name, **kwargs)` build exactly this ViT."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
            "init_values": self.init_values,
            "reg_tokens": self.reg_tokens,
            "class_token": self.class_token,
            "no_embed_class": self.no_embed_class,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields, plus the grid used and the weights' original grid (what a store records)."""
        return {**dataclasses.asdict(self), "grid_size": self.grid_size,
                "source_grid": self.source_grid or self.grid_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTArch:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _preset(name: str, timm_name: str, img: int, patch: int, dim: int, depth: int, heads: int,
            dec_dim: int, dec_heads: int) -> ViTArch:
    return ViTArch(name, timm_name, img, patch, dim, depth, heads, 4.0, dec_dim, dec_heads)


# Decoder widths for B and L follow the TEC reference (512 and 768, 16 heads). The small presets are this
# project's own, for 28-32 px images on CPUs: patch 4 keeps 49-64 tokens; depth is a multiple of 3 because the
# TEC encoder adaptor fuses groups of 3 consecutive block outputs.
ARCH_PRESETS: dict[str, ViTArch] = {
    a.name: a
    for a in (
        _preset("vit_tiny_patch16_224", "vit_tiny_patch16_224", 224, 16, 192, 12, 3, 256, 8),
        _preset("vit_small_patch16_224", "vit_small_patch16_224", 224, 16, 384, 12, 6, 256, 8),
        _preset("vit_base_patch16_224", "vit_base_patch16_224", 224, 16, 768, 12, 12, 512, 16),
        _preset("vit_large_patch16_224", "vit_large_patch16_224", 224, 16, 1024, 24, 16, 768, 16),
        # project presets for Fashion-MNIST-sized inputs (nano / micro / mini: the student sizes of `make study`)
        _preset("tec_pico_p4_16", "vit_tiny_patch16_224", 16, 4, 48, 3, 2, 32, 2),
        _preset("tec_nano_p4_28", "vit_tiny_patch16_224", 28, 4, 48, 6, 3, 64, 4),
        _preset("tec_micro_p4_28", "vit_tiny_patch16_224", 28, 4, 96, 6, 3, 64, 4),
        _preset("tec_mini_p4_28", "vit_tiny_patch16_224", 28, 4, 144, 6, 3, 64, 4),
        _preset("tec_tiny_p4_28", "vit_tiny_patch16_224", 28, 4, 192, 12, 3, 128, 4),
        _preset("tec_tiny_p4_32", "vit_tiny_patch16_224", 32, 4, 192, 12, 3, 128, 4),
    )
}


def default_decoder(embed_dim: int) -> tuple[int, int]:
    """(decoder width, decoder heads) for an encoder width that no preset names: the reference's 512/768 with 16
    heads for ViT-B/L, and the small presets' choices below that."""
    for min_dim, dec, heads in ((1024, 768, 16), (768, 512, 16), (192, 256, 8), (96, 64, 4)):
        if embed_dim >= min_dim:
            return dec, heads
    return 32, 2


def unsupported_features(model: torch.nn.Module) -> list[str]:
    """What in a timm model keeps it from being a base model or an encoder here (empty: supported)."""
    from timm.models.vision_transformer import Attention, Block

    if not isinstance(model, VisionTransformer):
        return [f"it is a {type(model).__name__}, not a timm VisionTransformer"]
    problems = []
    if model.cls_token is None:
        regs = f" ({model.num_reg_tokens} registers)" if getattr(model, "num_reg_tokens", 0) else ""
        problems.append(f"no CLS token{regs}: the attention targets are the CLS query row")
    if model.pos_embed is None:
        problems.append("no absolute pos_embed (rotary-only models are not supported)")
    patch, grid = tuple(model.patch_embed.patch_size), tuple(model.patch_embed.grid_size or (0, 0))
    if patch[0] != patch[1] or grid[0] != grid[1]:
        problems.append(f"a non-square patch {patch} or grid {grid}")
    odd = sorted({type(b).__name__ for b in model.blocks if not isinstance(b, Block)}
                 | {type(b.attn).__name__ for b in model.blocks if not isinstance(getattr(b, "attn", None), Attention)})
    if odd:
        problems.append(f"blocks other than timm Block/Attention ({', '.join(odd)})")
    elif not all(hasattr(b.mlp, "fc1") for b in model.blocks):  # its width gives mlp_ratio
        problems.append(f"an MLP without fc1 ({type(model.blocks[0].mlp).__name__})")
    return problems


def _mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio r with int(dim * r) == hidden, as timm sizes the MLP (hidden / dim itself may round down)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def arch_from_timm(name: str, img_size: int | None = None, **model_args: Any) -> ViTArch:
    """The ViTArch of timm model `name` (at `img_size`, default the model's own; `model_args` as in a timm
    config.json), read off the model timm builds.

    Raises ValueError for an unknown name and for what `unsupported_features` lists.
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown architecture {name!r}: neither a preset ({', '.join(sorted(ARCH_PRESETS))}) "
                         "nor a timm model name")
    with torch.device("meta"):  # shapes and attributes only, no memory or init cost
        model = timm.create_model(name, pretrained=False, **{**model_args, "num_classes": 0,
                                                             **({} if img_size is None else {"img_size": img_size})})
    problems = unsupported_features(model)
    if problems:
        raise ValueError(f"{name} is not supported as a base model or encoder: {'; '.join(problems)}")
    block = model.blocks[0]
    dim = model.embed_dim
    ls = block.ls1
    dec_dim, dec_heads = default_decoder(dim)
    return ViTArch(
        name=name, timm_name=name, img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        embed_dim=dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=_mlp_ratio(block.mlp.fc1.out_features, dim), decoder_embed_dim=dec_dim, decoder_num_heads=dec_heads,
        qkv_bias=block.attn.qkv.bias is not None, qk_norm=not isinstance(block.attn.q_norm, torch.nn.Identity),
        init_values=getattr(ls, "init_values", None), reg_tokens=model.num_reg_tokens, class_token=True,
        no_embed_class=model.no_embed_class)


# timm functions whose only defaults are sizes (all overridden by timm_kwargs): a model built from one of them is
# plain whatever its fields say. Other timm names may add what the fields do not record (pre-norm, SwiGLU, ...).
_PLAIN_TIMM_NAMES = {PLAIN_TIMM_NAME} | {a.timm_name for a in ARCH_PRESETS.values()}


# The name `plain_arch` gives a plain ViT that no preset names, e.g. vit_p4_16px_d48_l3_h2 (patch, input size,
# width, depth, heads; `_mlp<ratio>` when the MLP ratio is not 4): it says every size, so it resolves back to the
# same ViT and a saved config naming it re-runs the same job.
_PLAIN_NAME = re.compile(r"vit_p(\d+)_(\d+)px_d(\d+)_l(\d+)_h(\d+)(?:_mlp(\d+(?:\.\d+)?))?")


def plain_name(arch: ViTArch) -> str:
    """The self-describing name of a plain ViT of `arch`'s sizes (read back by `resolve_arch`)."""
    mlp = "" if arch.mlp_ratio == 4.0 else f"_mlp{arch.mlp_ratio!r}"
    return f"vit_p{arch.patch_size}_{arch.img_size}px_d{arch.embed_dim}_l{arch.depth}_h{arch.num_heads}{mlp}"


def _from_plain_name(name: str) -> ViTArch | None:
    match = _PLAIN_NAME.fullmatch(name)
    if match is None:
        return None
    patch, img, dim, depth, heads = (int(g) for g in match.groups()[:5])
    mlp_ratio = float(match.group(6)) if match.group(6) else 4.0
    return ViTArch(name, PLAIN_TIMM_NAME, img, patch, dim, depth, heads, mlp_ratio, *default_decoder(dim))


def resolve_arch(name: str, img_size: int | None = None) -> ViTArch:
    """A preset, a plain-ViT name of `plain_name`'s form, or any timm VisionTransformer name, optionally at
    another input size.

    Raises ValueError naming what is wrong (unknown name, unsupported model, a size the patch does not divide).
    """
    plain = _from_plain_name(name)
    if name in ARCH_PRESETS or plain is not None:
        arch = ARCH_PRESETS.get(name) or plain
        arch = arch if img_size is None else dataclasses.replace(arch, img_size=img_size)
    else:
        arch = arch_from_timm(name, img_size)
    if arch.img_size % arch.patch_size:
        raise ValueError(f"input size {arch.img_size} is not a multiple of {name}'s patch size {arch.patch_size}")
    return arch


def at_input_size(arch: ViTArch, img_size: int | None) -> ViTArch:
    """`arch` run at `img_size` (None: unchanged); the weights' original grid is kept in `source_grid`."""
    if img_size is None or img_size == arch.img_size:
        return arch
    if img_size % arch.patch_size:
        raise ValueError(f"--input-size {img_size} is not a multiple of {arch.name}'s patch size {arch.patch_size}")
    return dataclasses.replace(arch, img_size=img_size, source_grid=arch.source_grid or arch.grid_size)


def plain_arch(arch: ViTArch) -> ViTArch:
    """The plain ViT of `arch`'s sizes (what a TEC student is): no layer scale, registers or qk-norm.

    A non-plain architecture gets a name that says what it is, so nothing downstream mistakes the student for
    the timm model it was sized after.
    """
    if arch.is_plain and arch.source_grid is None and arch.timm_name in _PLAIN_TIMM_NAMES:
        return arch
    return dataclasses.replace(arch, name=plain_name(arch), timm_name=PLAIN_TIMM_NAME, qkv_bias=True, qk_norm=False,
                               init_values=None, reg_tokens=0, class_token=True, no_embed_class=False,
                               source_grid=None)


def build_vit(arch: ViTArch, num_classes: int = 0, init: bool = True, **overrides: Any) -> VisionTransformer:
    """A timm VisionTransformer for `arch` (LayerNorm eps 1e-6, as every timm ViT).

    init=False skips timm's weight initialisation (`weight_init='skip'`; the layers' own constructors still
    run, LayerNorm at ones and zeros): for a model whose weights are loaded next, or names and shapes on the
    meta device, where the initialisation runs through Python decompositions (ViT-B: 2.0 -> 1.05 s on CPU,
    0.19 -> 0.08 s on meta; tec_micro on meta 0.115 -> 0.02 s).
    """
    import timm

    kwargs = {**arch.timm_kwargs(), **({} if init else {"weight_init": "skip"}), **overrides}
    return timm.create_model(arch.timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding as in MAE, shape [1, (1 +) grid², D] float32.

    The first D/2 channels encode the column (x), the last D/2 the row (y); within each half the first quarter
    is sin, the second cos, with frequencies 1/10000^(2i/(D/2)). Patch order is row-major. The CLS row is 0.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    cols, rows = np.meshgrid(coords, coords)  # cols[r, c] = c, rows[r, c] = r (row-major flattening)
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def fold_mlp_cls_token(state_dict: dict[str, torch.Tensor], prefix: str = "cls_token_mlp.") -> dict[str, torch.Tensor]:
    """Fold the TEC input adaptor into a plain CLS token: cls_token <- MLP(cls_token), MLP keys removed.

    The MLP (timm Mlp: fc1, exact GELU, fc2) acts on the single learned token, not per image, and the CLS row of
    the sin-cos pos_embed is zero, so the folded token reproduces the student's encoder exactly.
    """
    if f"{prefix}fc1.weight" not in state_dict:
        return dict(state_dict)
    out = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    token = state_dict["cls_token"].float()
    hidden = torch.nn.functional.gelu(
        torch.nn.functional.linear(token, state_dict[f"{prefix}fc1.weight"].float(), state_dict[f"{prefix}fc1.bias"].float())
    )
    folded = torch.nn.functional.linear(hidden, state_dict[f"{prefix}fc2.weight"].float(), state_dict[f"{prefix}fc2.bias"].float())
    out["cls_token"] = folded.to(state_dict["cls_token"].dtype)
    return out


def init_mae_layers(module: torch.nn.Module) -> None:
    """MAE initialisation for `module.apply`: xavier-uniform Linear weights with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, torch.nn.LayerNorm):
        torch.nn.init.ones_(module.weight)
        torch.nn.init.zeros_(module.bias)
