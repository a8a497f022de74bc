"""Row-sparse (1 + k rows) vs full L×L attention targets in the last block, at several batch sizes.

Times come from `time_attention_targets` (whole target computation and the last block alone, interleaved
medians). Memory: the full path materialises the [B, H, N, N] logits and their softmax, the
row-sparse path only [B, H, 1 + k, N] logit rows (its attention output comes from the fused kernel); the
`*_matrix_mb` figures are those tensor sizes, and on CUDA the measured peak allocation of each path is added.
On CUDA everything runs under stage 1's bf16 autocast.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.bench.stage1 import stage1_autocast
from tec_pipeline.bench.timing import interleaved, timed
from tec_pipeline.models.targets import (
    compute_targets,
    full_attention_targets,
    last_block_full,
    last_block_row_sparse,
)
from tec_pipeline.models.vit import ViTArch, build_vit, resolve_arch


def logit_matrix_mb(arch: ViTArch, batch: int, k: int, dtype_bytes: int = 4) -> dict[str, float]:
    """Sizes (MB) of the attention tensors each path materialises in the last block."""
    n, heads = 1 + arch.num_patches, arch.num_heads
    return {"full_matrix_mb": 2 * batch * heads * n * n * dtype_bytes / 1e6,  # logits + softmax
            "row_sparse_matrix_mb": batch * heads * (1 + k) * n * dtype_bytes / 1e6}


def cuda_peak_mb(arch: ViTArch, batch: int, k: int, last_layers: int, device: torch.device) -> dict[str, float]:
    """Peak CUDA allocation (MB) of each path's whole target computation, beyond the model and input."""
    model = build_vit(arch).to(device).eval()
    x = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
    out: dict[str, float] = {}
    paths: dict[str, Callable[..., Any]] = {"row_sparse_peak_mb": compute_targets, "full_peak_mb": full_attention_targets}
    for name, fn in paths.items():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with stage1_autocast(device):
            fn(model, x, k, last_layers)
        torch.cuda.synchronize(device)
        out[name] = (torch.cuda.max_memory_allocated(device) - base) / 1e6
    return out


def _median_ms(fns: dict[str, Callable[[], object]], reps: int, device: str) -> dict[str, float]:
    """Median wall time (ms) of each callable over `reps` interleaved runs, after one warm-up run each
    (allocator and kernel selection)."""
    runs = {name: (lambda fn=fn: timed(fn, device)[1]) for name, fn in fns.items()}
    for run in runs.values():
        run()
    return {name: 1e3 * statistics.median(seconds) for name, seconds in interleaved(runs, reps).items()}


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
    whole = _median_ms({"row_sparse_ms": lambda: compute_targets(model, x, k, last_layers),
                        "full_ms": lambda: full_attention_targets(model, x, k, last_layers)}, reps, device)
    last = _median_ms({"last_block_row_sparse_ms": lambda: last_block_row_sparse(model.blocks[-1], h, k),
                       "last_block_full_ms": lambda: last_block_full(model.blocks[-1], h, k)}, 4 * reps, device)
    return {**whole, **last, "speedup": whole["full_ms"] / whole["row_sparse_ms"],
            "last_block_speedup": last["last_block_full_ms"] / last["last_block_row_sparse_ms"]}


def compare_attention(preset: BenchPreset, device: torch.device) -> dict[str, Any]:
    """Top level: the first batch size's figures; `batches`: every batch size's."""
    arch = resolve_arch(preset.arch)
    per_batch = {}
    for batch in preset.attention_batches:
        with stage1_autocast(device):
            figures = time_attention_targets(arch, batch=batch, reps=max(preset.reps, 3), k=preset.topk,
                                             last_layers=preset.last_layers, device=str(device))
        figures.update(logit_matrix_mb(arch, batch, preset.topk))
        if device.type == "cuda":
            figures.update(cuda_peak_mb(arch, batch, preset.topk, preset.last_layers, device))
        per_batch[str(batch)] = figures
    first = per_batch[str(preset.attention_batches[0])]
    return {**first, "batch": preset.attention_batches[0], "batches": per_batch,
            "faster_at_every_batch": all(f["speedup"] > 1.0 for f in per_batch.values())}
