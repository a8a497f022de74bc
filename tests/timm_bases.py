"""Tiny random timm base models in the formats people have (DINOv2 hub, timm HF layout, plain timm), and an
independent reference for their targets: timm's own `forward_intermediates` and the last block's logits by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, vit_small_patch14_reg4_dinov2

from tec_pipeline.models.targets import normalize_features

# A DINOv2-style ViT/14 with 4 registers and layer scale at test size: 42 px (3x3 patches), width 96, 3 heads.
TINY_DINOV2 = "vit_tinytest_patch14_reg4_dinov2"
TINY_DINOV2_ARGS = {"img_size": 42, "embed_dim": 96, "depth": 3, "num_heads": 3}


@register_model
def vit_tinytest_patch14_reg4_dinov2(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's own DINOv2-with-registers model function at a test size (what a user's real name resolves to)."""
    return vit_small_patch14_reg4_dinov2(pretrained=pretrained, **{**TINY_DINOV2_ARGS, **kwargs})


def random_timm(name: str, seed: int = 0, **kwargs: Any) -> VisionTransformer:
    """timm model `name` (headless) with random weights scaled so logits are O(1) and the top-k has no ties.

    Layer-scale gammas are O(1) too: at timm's 1e-5 init every block would be nearly the identity.
    """
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    dim = model.embed_dim
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("gamma"):
                param.normal_(0.5, 0.1)
            elif "norm" in key:
                param.normal_(1.0 if key.endswith("weight") else 0.0, 0.1)
            elif "qkv.weight" in key:
                param.normal_(0, dim**-0.5)
            elif key in ("cls_token", "reg_token", "pos_embed") or "qkv.bias" in key:
                param.normal_(0, 0.5)
            else:
                param.normal_(0, 0.05)
    return model


def save_dinov2_hub(model: VisionTransformer, path: Path) -> Path:
    """`model` (timm, registers, no_embed_class) saved with DINOv2's torch.hub key names and layout.

    DINOv2 keeps a CLS row in pos_embed and adds it to its cls_token, with the registers outside pos_embed;
    timm folds that row into cls_token (its `_convert_dinov2`). This is the inverse, with a random CLS row.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls_row = torch.randn(1, 1, model.embed_dim, generator=torch.Generator().manual_seed(5))
    state["cls_token"] = state["cls_token"] - cls_row
    state["pos_embed"] = torch.cat([cls_row, state["pos_embed"]], dim=1)
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    assert any(k.endswith("ls1.gamma") for k in state)
    torch.save(state, path)
    return path


def dynamic_twin(model: VisionTransformer, name: str, **kwargs: Any) -> VisionTransformer:
    """The same weights in a timm model that resamples pos_embed on the fly for any input size (timm's own path,
    independent of this project's loading)."""
    twin = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@torch.no_grad()
def reference_targets(model: VisionTransformer, x: torch.Tensor, k: int, last_layers: int) -> dict[str, torch.Tensor]:
    """Targets from timm's forward_intermediates (features, normalised) and q·kᵀ·scale by hand (attention)."""
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    kept = model.forward_intermediates(x, indices=last_layers, norm=False, output_fmt="NLC", intermediates_only=True)
    features = normalize_features(torch.stack(kept).mean(dim=0))
    patches, prefix_tokens = model.forward_intermediates(x, indices=[depth - 2], return_prefix_tokens=True,
                                                         norm=False, output_fmt="NLC", intermediates_only=True)[0]
    h = torch.cat([prefix_tokens, patches], dim=1)  # the last block's input [B, P + L, D]
    last, (b, n, d) = model.blocks[-1], h.shape
    heads = last.attn.num_heads
    normed = F.layer_norm(h, (d,), last.norm1.weight, last.norm1.bias, last.norm1.eps)
    qkv = F.linear(normed, last.attn.qkv.weight, last.attn.qkv.bias)
    q, key, _ = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if isinstance(last.attn.q_norm, torch.nn.LayerNorm):  # qk-norm: LayerNorm over each head's channels
        q = F.layer_norm(q, (d // heads,), last.attn.q_norm.weight, last.attn.q_norm.bias, last.attn.q_norm.eps)
        key = F.layer_norm(key, (d // heads,), last.attn.k_norm.weight, last.attn.k_norm.bias, last.attn.k_norm.eps)
    logits = (q @ key.transpose(-2, -1)) * (d // heads) ** -0.5  # [B, H, N, N]
    index = logits[:, :, 0, prefix:].mean(dim=1).topk(k).indices
    queries = torch.cat([torch.zeros_like(index[:, :1]), prefix + index], dim=1)
    rows = torch.stack([logits[i][:, queries[i], prefix:] for i in range(b)]).permute(0, 2, 1, 3)
    return {"features": features, "attention": rows, "topk_index": index}
