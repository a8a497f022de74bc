"""Enhanced targets of a frozen base model (tec-method.md §2): features, attention-logit rows, top-k indices.

For views x [B,3,S,S] and a timm VisionTransformer with L patches, width D, H heads, and P prefix tokens before
the patches (the CLS token, then any registers):
- features [B,L,D]: mean of the last `last_layers` block outputs over the patch tokens only (CLS and registers
  dropped), pre-norm residual stream (the final norm is never applied);
- attention [B,1+k,H,L]: the last block's pre-softmax logits q·kᵀ·head_dim^-0.5 for the CLS query row, then the
  k patch-query rows at the patch positions topk_index, over the patch keys only (CLS and register keys
  dropped); always computed in fp32, whatever the autocast;
- topk_index [B,k] int64 patch indices 0..L-1, by descending head-mean CLS→patch logit (fp32).

No block code is copied: timm runs the model (`forward_intermediates` returns the last blocks' patch tokens),
a forward pre-hook takes the last block's input, and q and k come from that block's own modules (norm1, the
k and q slices of attn.qkv, attn.q_norm / attn.k_norm), so every timm block variant is handled by timm.
`compute_targets` forms only the 1+k needed logit rows (keys for all tokens, queries for the 1+k rows);
`full_attention_targets` is the naive reference (the whole [B,H,N,N] logits, as the TEC reference code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from tec_pipeline.config import require
from tec_pipeline.models.vit import ViTArch, unsupported_features

Tensor = torch.Tensor
# What computes the targets, recorded in every store (a resume across implementations would mix two kinds of
# rows): version 2 takes block outputs from timm's forward_intermediates and the 1+k attention rows and the
# top-k ranking in fp32 whatever the autocast; version 1 (before) computed the rows in the autocast dtype.
TARGETS_IMPLEMENTATION = {"name": "timm forward_intermediates; last-block q/k rows in fp32", "version": 2}


def target_shapes(arch: ViTArch, k: int) -> dict[str, tuple[int, ...]]:
    """Per-view shapes of the three targets (what one store row holds)."""
    return {
        "features": (arch.num_patches, arch.embed_dim),
        "attention": (1 + k, arch.num_heads, arch.num_patches),
        "topk_index": (k,),
    }


def normalize_features(features: Tensor, eps: float = 1e-6) -> Tensor:
    """Per image and channel across patches: (t - mean) / sqrt(var + eps), unbiased var over dim 1.

    features: [B,L,D] → [B,L,D], computed in fp32 (what stage 1 stores and the feature loss uses).
    """
    t = features.float()
    mean = t.mean(dim=1, keepdim=True)
    var = t.var(dim=1, keepdim=True, unbiased=True)
    return (t - mean) / torch.sqrt(var + eps)


def _validate(model: VisionTransformer, k: int, last_layers: int) -> None:
    problems = unsupported_features(model)
    require(not problems, "the base model is not supported: " + "; ".join(problems))
    depth, num_patches = len(model.blocks), model.patch_embed.num_patches
    require(1 <= k <= num_patches, f"k (--topk) must be in 1..{num_patches} (the number of patches), got {k}")
    require(1 <= last_layers <= depth, f"--last-layers must be in 1..{depth} (the depth), got {last_layers}")


def _heads(attn: Attention, x: Tensor, which: int) -> Tensor:
    """x [B,n,D] (normed) → q (which=0) or k (which=1) [B,H,n,head_dim] in fp32, with the block's q/k norm.

    Only that third of attn.qkv is applied: qkv is laid out [q | k | v], heads contiguous (spec §13.4).
    """
    width = attn.num_heads * attn.head_dim
    weight = attn.qkv.weight[which * width:(which + 1) * width].float()
    bias = None if attn.qkv.bias is None else attn.qkv.bias[which * width:(which + 1) * width].float()
    b, n, _ = x.shape
    out = torch.nn.functional.linear(x, weight, bias).reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    return (attn.q_norm if which == 0 else attn.k_norm)(out)


def _rank(cls_row: Tensor, k: int) -> Tensor:
    """cls_row [B,H,L] CLS-query logits over patch keys → topk_index [B,k] by head-mean, descending."""
    return cls_row.mean(dim=1).topk(k, dim=-1, largest=True, sorted=True).indices


def last_block_row_sparse(block: Block, h: Tensor, k: int, prefix: int = 1) -> tuple[Tensor, Tensor]:
    """Attention targets of the last block from its input h [B,N,D] (N = prefix + L), only the 1+k needed rows.

    Returns (attention [B,1+k,H,L] fp32, topk_index [B,k]). Runs in fp32 with autocast off: the ranking and the
    logits must not depend on the autocast dtype.
    """
    with torch.autocast(h.device.type, enabled=False):
        normed = block.norm1(h.float())
        keys = _heads(block.attn, normed, 1)[:, :, prefix:]  # patch keys only [B,H,L,hd]
        scale = block.attn.head_dim**-0.5
        cls_row = (_heads(block.attn, normed[:, :1], 0) @ keys.transpose(-2, -1)) * scale  # [B,H,1,L]
        index = _rank(cls_row[:, :, 0], k)
        rows = normed.gather(1, (prefix + index)[..., None].expand(-1, -1, normed.shape[-1]))  # [B,k,D]
        patch_rows = (_heads(block.attn, rows, 0) @ keys.transpose(-2, -1)) * scale  # [B,H,k,L]
        attention = torch.cat([cls_row, patch_rows], dim=2)
    return attention.permute(0, 2, 1, 3).contiguous(), index


def last_block_full(block: Block, h: Tensor, k: int, prefix: int = 1) -> tuple[Tensor, Tensor]:
    """Naive reference of `last_block_row_sparse`: materialises the full [B,H,N,N] logits."""
    with torch.autocast(h.device.type, enabled=False):
        normed = block.norm1(h.float())
        logits = (_heads(block.attn, normed, 0) @ _heads(block.attn, normed, 1).transpose(-2, -1))
        logits = logits * block.attn.head_dim**-0.5  # [B,H,N,N]
    index = _rank(logits[:, :, 0, prefix:], k)
    b, heads, n, _ = logits.shape
    queries = torch.cat([torch.zeros_like(index[:, :1]), prefix + index], dim=1)  # token positions [B,1+k]
    rows = logits.gather(2, queries[:, None, :, None].expand(b, heads, -1, n))[..., prefix:]
    return rows.permute(0, 2, 1, 3).contiguous(), index


LastBlock = Callable[[Block, Tensor, int, int], tuple[Tensor, Tensor]]


def _targets(model: VisionTransformer, x: Tensor, k: int, last_layers: int, last_block: LastBlock) -> dict[str, Tensor]:
    """timm's forward_intermediates for the features; a pre-hook hands the last block's input to `last_block`."""
    _validate(model, k, last_layers)
    captured: list[Tensor] = []
    hook = model.blocks[-1].register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        kept = model.forward_intermediates(x, indices=last_layers, norm=False, output_fmt="NLC",
                                           intermediates_only=True)  # last_layers x [B,L,D], patches only
    finally:
        hook.remove()
    attention, index = last_block(model.blocks[-1], captured[0], k, model.num_prefix_tokens)
    return {"features": torch.stack(kept).sum(dim=0) / last_layers, "attention": attention, "topk_index": index}


@torch.no_grad()
def compute_targets(model: VisionTransformer, x: Tensor, k: int, last_layers: int = 2) -> dict[str, Tensor]:
    """Targets for views x [B,3,S,S]: {'features' [B,L,D], 'attention' [B,1+k,H,L] fp32, 'topk_index' [B,k] int64}.

    Under autocast the residual stream (features) stays fp32 (the fp32 pos_embed promotes it); the attention
    rows and the ranking are fp32 whatever the autocast. Raises UserError for k or last_layers out of range.
    """
    return _targets(model, x, k, last_layers, last_block_row_sparse)


@torch.no_grad()
def stored_targets(model: VisionTransformer, x: Tensor, k: int, last_layers: int = 2) -> dict[str, Tensor]:
    """Targets as stage 1 stores them and stage 2 consumes them: features normalised (fp32), attention fp32.

    The one definition shared by `cache-targets`, online `pretrain` and `verify`, so cached and online
    training see the same numbers.
    """
    t = compute_targets(model, x, k, last_layers)
    return {"features": normalize_features(t["features"]), "attention": t["attention"].float(),
            "topk_index": t["topk_index"]}


@torch.no_grad()
def full_attention_targets(model: VisionTransformer, x: Tensor, k: int, last_layers: int = 2) -> dict[str, Tensor]:
    """Same as `compute_targets`, but the last block materialises the full [B,H,N,N] logits (reference)."""
    return _targets(model, x, k, last_layers, last_block_full)
