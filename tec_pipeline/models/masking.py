"""MAE's per-sample random masking and its inverse, shared by the plain MAE and the TEC student.

One module below both models, so that neither imports the other and the two cannot drift apart: the TEC
student masks exactly as MAE does (spec §3.1), which the MAE and student equivalence tests rely on.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE per-sample masking by sorting noise (small noise = kept).

    x: [B, L, C]; noise: [B, L] (default U(0, 1)). Returns kept tokens [B, L_keep, C] in ascending-noise order
    with L_keep = int(L·(1 - mask_ratio)), mask [B, L] (1 = removed, 0 = kept, in patch order) and
    ids_restore [B, L] (argsort of the shuffle, to put tokens back in patch order).
    """
    batch, length, channels = x.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=x.device)
    if noise.shape != (batch, length):
        raise ValueError(f"noise must be [B, L] = {(batch, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, channels))
    # the mask stays at least fp32 under autocast (it is a loss weight); fp64 runs keep fp64
    mask = torch.ones(batch, length, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def restore_sequence(tokens: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """Undo the masking shuffle: fill removed positions with `mask_token` and return to patch order.

    tokens: [B, 1 + L_keep, C] (CLS first); mask_token: [1, 1, C]; ids_restore: [B, L] -> [B, 1 + L, C].
    """
    batch, _, channels = tokens.shape
    length = ids_restore.shape[1]
    fill = mask_token.expand(batch, length + 1 - tokens.shape[1], -1).to(tokens.dtype)
    shuffled = torch.cat([tokens[:, 1:], fill], dim=1)
    patches = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, channels))
    return torch.cat([tokens[:, :1], patches], dim=1)
