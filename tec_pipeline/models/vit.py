"""ViT architectures: a string registry of size presets, built with timm, and the fixed 2-D sin-cos embedding.

Every model in the project (base model, TEC student, MAE, exported weights) is described by one `ViTArch`, so
that a checkpoint can record its architecture as a plain dict and be rebuilt with nothing else known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class ViTArch:
    """A plain ViT/patch-N with a CLS token (timm layout), plus the TEC/MAE decoder width used with it."""

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

    def timm_kwargs(self) -> dict[str, Any]:
        """Constructor arguments that make `timm.create_model(timm_name, **kwargs)` build exactly this ViT."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": True,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        # project presets for Fashion-MNIST-sized inputs
        _preset("tec_pico_p4_16", "vit_tiny_patch16_224", 16, 4, 48, 3, 2, 32, 2),
        _preset("tec_micro_p4_28", "vit_tiny_patch16_224", 28, 4, 96, 6, 3, 64, 4),
        _preset("tec_tiny_p4_28", "vit_tiny_patch16_224", 28, 4, 192, 12, 3, 128, 4),
        _preset("tec_tiny_p4_32", "vit_tiny_patch16_224", 32, 4, 192, 12, 3, 128, 4),
    )
}


def resolve_arch(name: str) -> ViTArch:
    """A preset by name; raises ValueError listing the known names otherwise."""
    if name not in ARCH_PRESETS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCH_PRESETS))}")
    return ARCH_PRESETS[name]


def build_vit(arch: ViTArch, num_classes: int = 0, **overrides: Any) -> VisionTransformer:
    """A timm VisionTransformer for `arch` (CLS token, learnable pos_embed incl. the CLS row, LayerNorm eps 1e-6)."""
    import timm

    kwargs = {**arch.timm_kwargs(), **overrides}
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
