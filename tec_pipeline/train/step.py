"""One optimizer step of the training loop, and the loss window that keeps the host from syncing every step.

Loss terms stay on the device: each optimizer step adds its terms (averaged over its micro-batches) to a
`LossWindow`. Every `log_every` optimizer steps, and before every checkpoint, the window is reduced in one
all-reduce with one host transfer: that is where the metrics row is written and where a non-finite loss is
caught. So a NaN at step s is seen at most `log_every − 1` optimizer steps later, and never after a
checkpoint has been written past it: the last checkpoint on disk is always from before the bad step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tec_pipeline.errors import UserError
from tec_pipeline.train import checkpoint as ckpt_io
from tec_pipeline.train import distributed as tdist

if TYPE_CHECKING:  # the loop imports this module; its _Run is only a type here
    from tec_pipeline.train.loop import _Run

Batch = Any
StepFn = Callable[[nn.Module, Batch], dict[str, torch.Tensor]]


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stopped without checkpointing the bad state."""


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor inside `batch` (tensor, dict, list or tuple) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def loss_terms(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 0-d entries of a step's output, detached, float32, still on the device ('loss' required)."""
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError("the training step must return a dict with a 'loss' entry")
    return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim == 0}


def non_finite_message(loss: float, epoch: int, step: int, run_dir: Path) -> str:
    latest = run_dir / ckpt_io.LATEST
    last_good = str(latest) if latest.exists() else "none written yet"
    # only flags every training command has (tec pretrain has no --clip-grad); a resume keeps the settings, so
    # new ones mean a new run: from scratch, or from the last good weights
    return (f"loss became {loss} at epoch {epoch} step {step}; last good checkpoint: {last_good} — lower --blr "
            "or lengthen --warmup-epochs and start over with --overwrite, or continue from that checkpoint with "
            "--init-from it and a new --out")


@dataclass
class LossWindow:
    """Per-step loss terms (device tensors) and timings since the last reduction."""

    terms: list[torch.Tensor] = field(default_factory=list)  # one [T] tensor per optimizer step
    names: tuple[str, ...] = ()
    epochs: list[int] = field(default_factory=list)  # epoch of each step
    lr: float = 0.0
    images: int = 0
    wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, terms: dict[str, torch.Tensor], epoch: int, lr: float, images: int, wait: float) -> None:
        if not self.terms:
            self.names = tuple(terms)
        self.terms.append(torch.stack([terms[k] for k in self.names]))
        self.epochs.append(epoch)
        self.lr, self.images, self.wait = lr, self.images + images, self.wait + wait

    def reduce(self, last_step: int, run_dir: Path) -> dict[str, float] | None:
        """Averages over the window's steps (and ranks), or None when empty. Collective: every rank calls it at
        the same steps. NonFiniteLossError naming the first step whose loss is not finite."""
        if not self.terms:
            return None
        per_step = tdist.all_reduce_mean(torch.stack(self.terms)).cpu()  # the window's one host sync
        losses = per_step[:, self.names.index("loss")].tolist()
        first = last_step - len(losses)  # 0-based index of the window's first step
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise NonFiniteLossError(non_finite_message(loss, self.epochs[i], first + i, run_dir))
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        means = per_step.mean(dim=0).tolist()
        return {"lr": self.lr, **dict(zip(self.names, means, strict=True)), "img_per_s": self.images / elapsed,
                "data_wait": self.wait / elapsed}


def optimizer_step(run: _Run, it: Iterator[Batch], group: int, step_fn: StepFn,
                   epoch: int) -> tuple[dict[str, torch.Tensor], float]:
    """Run `group` micro-batches and one optimizer step, without a host sync.

    Returns the loss terms averaged over the micro-batches (device tensors) and the seconds spent waiting for
    the loader.
    """
    totals: dict[str, torch.Tensor] = {}
    wait = 0.0
    for j in range(group):
        t0 = time.perf_counter()
        with ckpt_io.preserved_rng():
            batch = next(it, None)
        if batch is None:
            raise RuntimeError(f"the loader ran out of micro-batches in epoch {epoch}; every rank must yield "
                               f"{run.micro_per_epoch} per epoch")
        batch = to_device(batch, run.device)
        wait += time.perf_counter() - t0
        last = j == group - 1
        # gradients are all-reduced once per optimizer step, on its last micro-batch
        sync = contextlib.nullcontext() if last or run.wrapped is run.model else run.wrapped.no_sync()
        with sync:
            with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
                out = step_fn(run.wrapped, batch)
            run.scaler.scale(out["loss"] / group).backward()
        for k, v in loss_terms(out).items():
            totals[k] = totals[k] + v / group if k in totals else v / group
    if run.cfg.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return totals, wait
