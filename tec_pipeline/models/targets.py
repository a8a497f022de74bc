"""Enhanced targets of a frozen base model (tec-method.md §2): features, attention-logit rows, top-k indices.

For views x [B,3,S,S] and a timm VisionTransformer with L patches, width D, H heads:
- features [B,L,D]: mean of the last `last_layers` block outputs, CLS dropped, pre-norm residual stream (the
  final norm is never applied);
- attention [B,1+k,H,L]: the last block's pre-softmax logits q·kᵀ·head_dim^-0.5 for the CLS query row, then the
  k patch-query rows at token positions 1+topk_index, CLS key column dropped;
- topk_index [B,k] int64 patch indices 0..L-1, by descending head-mean CLS→patch logit.

`compute_targets` runs every block with fused attention and forms only the 1+k needed logit rows of the last
block, reusing that block's qkv for its output. `full_attention_targets` is the naive reference (the whole
[B,H,N,N] logits, as the TEC reference code computes them), kept for tests and the benchmark.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from tec_pipeline.config import require
from tec_pipeline.models.vit import ViTArch, build_vit, resolve_arch

Tensor = torch.Tensor


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
    require(model.cls_token is not None and model.reg_token is None and not model.no_embed_class,
            "the base model must be a plain ViT with a CLS token, no register tokens, pos_embed incl. CLS")
    depth, num_patches = len(model.blocks), model.patch_embed.num_patches
    require(1 <= k <= num_patches, f"k (--topk) must be in 1..{num_patches} (the number of patches), got {k}")
    require(1 <= last_layers <= depth, f"--last-layers must be in 1..{depth} (the depth), got {last_layers}")
    last = model.blocks[-1]
    if not (isinstance(last, Block) and isinstance(last.attn, Attention)):
        raise TypeError(f"the last block must be a timm Block with Attention, got {type(last).__name__}")


def _embed(model: VisionTransformer, x: Tensor) -> Tensor:
    """x [B,3,S,S] → tokens [B,1+L,D]: patch_embed, prepend CLS, add the whole pos_embed (CLS row included)."""
    patches = model.patch_embed(x)
    cls = model.cls_token.expand(patches.shape[0], -1, -1)
    return model.norm_pre(torch.cat([cls, patches], dim=1) + model.pos_embed)


def _qkv(block: Block, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """normed [B,N,D] (= block.norm1(h)) → q, k, v [B,H,N,head_dim]; qkv laid out [q|k|v], heads contiguous."""
    attn = block.attn
    b, n, _ = normed.shape
    qkv = attn.qkv(normed).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _finish_block(block: Block, h: Tensor, normed: Tensor, heads_out: Tensor) -> Tensor:
    """The rest of timm's Block.forward, given the attention output heads_out [B,H,N,head_dim] → [B,N,D]."""
    attn = block.attn
    b, _, n, _ = heads_out.shape
    y = attn.norm(heads_out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    gate = getattr(attn, "gate", None)  # only in newer timm (gated attention); None for a plain ViT
    if gate is not None:
        y = y * gate(normed).sigmoid()
    h = h + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(y))))
    return h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))


def _rank(cls_row: Tensor, k: int) -> Tensor:
    """cls_row [B,H,N] pre-softmax CLS-query logits → topk_index [B,k] by head-mean over patch keys, descending."""
    return cls_row[:, :, 1:].mean(dim=1).topk(k, dim=-1, largest=True, sorted=True).indices


def last_block_row_sparse(block: Block, h: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Last block, fused attention, only the 1+k needed logit rows. h [B,N,D] → (output [B,N,D],
    attention [B,1+k,H,L], topk_index [B,k])."""
    normed = block.norm1(h)
    q, key, v = _qkv(block, normed)
    out = _finish_block(block, h, normed, F.scaled_dot_product_attention(q, key, v))
    scale = block.attn.head_dim**-0.5
    cls_row = (q[:, :, :1] @ key.transpose(-2, -1)) * scale  # [B,H,1,N]
    index = _rank(cls_row[:, :, 0], k)
    rows = q.gather(2, (1 + index)[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))  # [B,H,k,hd]
    patch_rows = (rows @ key.transpose(-2, -1)) * scale  # [B,H,k,N]
    attention = torch.cat([cls_row, patch_rows], dim=2)[..., 1:]  # CLS key column dropped
    return out, attention.permute(0, 2, 1, 3).contiguous(), index


def last_block_full(block: Block, h: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Naive reference of `last_block_row_sparse`: materialises the full [B,H,N,N] logits and softmax."""
    normed = block.norm1(h)
    q, key, v = _qkv(block, normed)
    logits = (q @ key.transpose(-2, -1)) * block.attn.head_dim**-0.5  # [B,H,N,N]
    out = _finish_block(block, h, normed, logits.softmax(dim=-1) @ v)
    index = _rank(logits[:, :, 0], k)
    b, heads, n, _ = logits.shape
    queries = torch.cat([torch.zeros_like(index[:, :1]), 1 + index], dim=1)  # token positions [B,1+k]
    rows = logits.gather(2, queries[:, None, :, None].expand(b, heads, -1, n))[..., 1:]
    return out, rows.permute(0, 2, 1, 3).contiguous(), index


LastBlock = Callable[[Block, Tensor, int], tuple[Tensor, Tensor, Tensor]]


def _targets(model: VisionTransformer, x: Tensor, k: int, last_layers: int, last_block: LastBlock) -> dict[str, Tensor]:
    _validate(model, k, last_layers)
    h = _embed(model, x)
    depth = len(model.blocks)
    kept = []
    for i, block in enumerate(model.blocks[:-1]):
        h = block(h)
        if i >= depth - last_layers:
            kept.append(h[:, 1:])
    h, attention, index = last_block(model.blocks[-1], h, k)
    kept.append(h[:, 1:])
    return {"features": torch.stack(kept).sum(dim=0) / last_layers, "attention": attention, "topk_index": index}


@torch.no_grad()
def compute_targets(model: VisionTransformer, x: Tensor, k: int, last_layers: int = 2) -> dict[str, Tensor]:
    """Targets for views x [B,3,S,S]: {'features' [B,L,D], 'attention' [B,1+k,H,L], 'topk_index' [B,k] int64}.

    Under autocast the residual stream (features) stays fp32 (the fp32 pos_embed promotes it) and the attention
    logits come out in the autocast dtype, as in the reference. Raises UserError for k or last_layers out of range.
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


def _interleaved_median_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time (ms) of each callable; runs alternate so load changes on a shared host hit all alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator and kernel selection
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def time_attention_targets(arch: ViTArch | str, batch: int = 8, reps: int = 5, k: int = 15,
                           last_layers: int = 2, device: str = "cpu") -> dict[str, float]:
    """Median wall time (ms) of row-sparse vs full attention targets on a random-init ViT, batch of random views.

    Whole target computation (`row_sparse_ms`, `full_ms`, `speedup` = full / row-sparse) and the last block
    alone (`last_block_*`, where the two paths differ; 4x the reps, it is cheap). CUDA work is synchronised
    before each clock read.
    """
    arch = resolve_arch(arch) if isinstance(arch, str) else arch
    model = build_vit(arch).to(device).eval()
    x = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
    h = torch.randn(batch, 1 + arch.num_patches, arch.embed_dim, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(fn: Callable[..., object], *args: object) -> Callable[[], object]:
        return lambda: (fn(*args), sync())

    whole = _interleaved_median_ms({"row_sparse_ms": run(compute_targets, model, x, k, last_layers),
                                    "full_ms": run(full_attention_targets, model, x, k, last_layers)}, reps)
    last = _interleaved_median_ms({"last_block_row_sparse_ms": run(last_block_row_sparse, model.blocks[-1], h, k),
                                   "last_block_full_ms": run(last_block_full, model.blocks[-1], h, k)}, 4 * reps)
    return {**whole, **last, "speedup": whole["full_ms"] / whole["row_sparse_ms"],
            "last_block_speedup": last["last_block_full_ms"] / last["last_block_row_sparse_ms"]}
