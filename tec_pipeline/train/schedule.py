"""Learning-rate arithmetic: effective batch, absolute lr, and the per-step warm-up + half-cycle cosine.

Everything here is a pure function of its arguments, so the schedule needs no state beyond the optimizer-step
count that the checkpoint already records. Progress is measured in (fractional) epochs of optimizer steps,
which reproduces MAE's `util/lr_sched.adjust_learning_rate` exactly when accum = 1.
"""

from __future__ import annotations

import math

import torch


def effective_batch(batch_size: int, accum: int, world_size: int) -> int:
    """Images per optimizer step: per-rank micro-batch × accumulation steps × ranks."""
    return batch_size * accum * world_size


def absolute_lr(blr: float, eff_batch: int) -> float:
    """MAE's linear scaling rule: lr = blr × effective batch / 256."""
    return blr * eff_batch / 256


def optimizer_steps_per_epoch(micro_batches: int, accum: int) -> int:
    """Optimizer steps in an epoch of `micro_batches`; a short last group still makes a step."""
    return math.ceil(micro_batches / accum)


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The learning rate at fractional epoch `epoch`: linear warm-up from 0, then cosine down to `min_lr`.

    epoch < warmup_epochs: lr · epoch / warmup_epochs (0 at the very first step, as in MAE).
    otherwise:             min_lr + (lr − min_lr) · ½ · (1 + cos(π · (epoch − warmup) / (epochs − warmup))).
    """
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    if span <= 0:
        return lr
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at_step(step: int, steps_per_epoch: int, lr: float, min_lr: float, warmup_epochs: float,
               epochs: float) -> float:
    """`lr_at` for optimizer step `step` (0-based) with `steps_per_epoch` optimizer steps per epoch."""
    return lr_at(step / steps_per_epoch, lr, min_lr, warmup_epochs, epochs)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` × its `lr_scale` (layer-wise decay groups carry one; others use 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
