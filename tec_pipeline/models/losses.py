"""The two TEC losses (spec §3.7, §11.1, §11.4), computed in fp32 (fp64 stays fp64) even under autocast.

Both losses are the only definition of the training objective: the student, online and cached training all
call these two functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _loss_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 if any input is fp64 (so gradient checks can run in fp64)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def normalize_feature_target(target: Tensor, eps: float = 1e-6) -> Tensor:
    """Per image and channel, across patches: (t - mean) / sqrt(var + eps), unbiased var over dim=1.

    target: [B, L, D] -> [B, L, D] in the loss dtype. This is TEC's normalisation, not MAE's per-patch one.
    """
    target = target.to(_loss_dtype(target))
    mean = target.mean(dim=1, keepdim=True)
    var = target.var(dim=1, keepdim=True, unbiased=True)
    return (target - mean) / (var + eps).sqrt()


def feature_loss(pred: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Masked feature-regression loss, a scalar.

    pred: [B, L, D] student prediction; target: [B, L, D] teacher features; mask: [B, L], 1 = removed patch
    (only removed patches count), 0 = kept. The target is normalised by `normalize_feature_target`, then
    loss = mean over channels of (pred - t̂)² -> [B, L], and Σ(loss·mask) / Σmask over the whole batch.

    Targets that were stored already normalised (the store's convention) are normalised again here, which is
    harmless: their mean is 0 and unbiased variance v/(v + eps) ≈ 1 (v: raw variance), so the second pass only
    scales them by 1/sqrt(v/(v + eps) + eps) ≈ sqrt(1/(1 + 1e-6)), a relative change of 5e-7 — below fp16
    storage rounding; the loss changes by < 1e-5.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"feature_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and "
                         f"mask {tuple(mask.shape)} must be [B,L,D], [B,L,D], [B,L]")
    dtype = _loss_dtype(pred, target)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        target_hat = normalize_feature_target(target.to(dtype), eps)
        per_patch = (pred.to(dtype) - target_hat).pow(2).mean(dim=-1)
        mask = mask.to(dtype)
        return (per_patch * mask).sum() / mask.sum()


def attention_loss(pred: Tensor, target: Tensor, tau: float) -> Tensor:
    """Soft cross-entropy between attention-logit rows, a scalar.

    pred, target: [B, R, H, L] pre-softmax logits over the L patch keys, R = 1 + k query rows (CLS first).
    loss = mean over (B, R, H) of Σ_keys -softmax(target / tau) · log_softmax(pred). The temperature applies
    only to the target. There is no mask: every row counts, whether its query patch was masked or not.
    """
    if pred.shape != target.shape:
        raise ValueError(f"attention_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; "
                         "both must be [B, 1+k, H, L]")
    dtype = _loss_dtype(pred, target)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p_target = F.softmax(target.to(dtype) / tau, dim=-1)
        log_pred = F.log_softmax(pred.to(dtype), dim=-1)
        return -(p_target * log_pred).sum(dim=-1).mean()
