"""Plain MAE (He et al.), to train a base model where none can be downloaded.

The encoder is made of timm pieces under timm VisionTransformer key names (cls_token, pos_embed, patch_embed.proj,
blocks.{i}, norm), so its weights load into `build_vit(arch)` after dropping the `decoder_*`/`mask_token` keys.
pos_embed and decoder_pos_embed are fixed 2-D sin-cos tables (requires_grad False) with a zero CLS row.
Masking, initialisation and the per-patch normalised pixel loss follow facebookresearch/mae exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from tec_pipeline.models.masking import random_masking, restore_sequence
from tec_pipeline.models.vit import ViTArch, init_mae_layers, sincos_pos_embed_2d

DECODER_PREFIXES = ("decoder_", "mask_token")  # keys that are not part of the encoder


def default_decoder_depth(arch: ViTArch) -> int:
    """MAE's 8 decoder blocks for ViT-B and larger, 4 for the small project presets."""
    return 8 if arch.embed_dim >= 768 else 4


@dataclass(frozen=True)
class MAEConfig:
    """Decoder and objective of a plain MAE; None widths/heads come from the arch."""

    mask_ratio: float = 0.75
    decoder_depth: int | None = None
    decoder_embed_dim: int | None = None
    decoder_num_heads: int | None = None
    norm_pix_loss: bool = True

    def resolved(self, arch: ViTArch) -> MAEConfig:
        """The same config with every None replaced by the arch's default."""
        return MAEConfig(self.mask_ratio,
                         self.decoder_depth or default_decoder_depth(arch),
                         self.decoder_embed_dim or arch.decoder_embed_dim,
                         self.decoder_num_heads or arch.decoder_num_heads,
                         self.norm_pix_loss)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder (`arch`) and a light ViT decoder predicting the pixels of masked patches."""

    def __init__(self, arch: ViTArch, config: MAEConfig = MAEConfig()) -> None:
        super().__init__()
        self.arch, self.config = arch, config.resolved(arch)
        c, d, L = self.config, arch.embed_dim, arch.num_patches
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, 3, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + L, d), requires_grad=False)
        self.blocks = _blocks(d, arch.depth, arch.num_heads, arch.mlp_ratio)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        dd = c.decoder_embed_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + L, dd), requires_grad=False)
        self.decoder_blocks = _blocks(dd, c.decoder_depth, c.decoder_num_heads, arch.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, arch.patch_size**2 * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        g = self.arch.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.arch.embed_dim, g))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.config.decoder_embed_dim, g))
        # patch_embed like nn.Linear on its flattened view; its bias keeps the Conv2d default (spec §13.2)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_mae_layers)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → [B, L, p·p·3] (row-major patches, pixel order (p, q, c) as in MAE)."""
        p, g = self.arch.patch_size, self.arch.grid_size
        x = images.reshape(images.shape[0], 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(images.shape[0], g * g, p * p * 3)

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] → latent [B, 1+K, D] (after norm), mask [B, L], ids_restore [B, L]."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # pos_embed before masking, CLS after
        x, mask, ids_restore = random_masking(x, self.config.mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D], ids_restore [B, L] → pixel predictions [B, L, p·p·3]."""
        x = restore_sequence(self.decoder_embed(latent), self.mask_token, ids_restore) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on removed patches; targets normalised per patch (MAE's norm_pix_loss)."""
        target = self.patchify(images)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.float() - target).pow(2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B, 3, S, S] → {'loss': scalar, 'pred': [B, L, p·p·3], 'mask': [B, L]}."""
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss": self.forward_loss(images, pred, mask), "pred": pred, "mask": mask}


def mae_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training-loop step: the loss of `model` (MAE, possibly DDP-wrapped) on batch['images']."""
    out = model(batch["images"])
    return {"loss": out["loss"]}


def encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of an MAE state dict, under timm VisionTransformer names."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}


def checkpoint_extra(arch: ViTArch, config: MAEConfig) -> dict[str, Any]:
    """What an MAE training checkpoint records besides the loop's entries ('arch', 'kind', 'mae')."""
    resolved = config.resolved(arch)
    return {"arch": arch.to_dict(), "kind": "mae",
            "mae": {"mask_ratio": resolved.mask_ratio, "decoder_depth": resolved.decoder_depth,
                    "decoder_embed_dim": resolved.decoder_embed_dim,
                    "decoder_num_heads": resolved.decoder_num_heads, "norm_pix_loss": resolved.norm_pix_loss}}
