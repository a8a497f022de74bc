"""The shared training loop (MAE's engine_pretrain, made resumable): used by `tec mae-pretrain`, `tec pretrain`
and `tec finetune`.

Contract
--------
`run_training(model, batches, steps_per_epoch, cfg, run_dir, checkpoint_extra, step_fn=None, run_config=None)`

- `batches(epoch, start_batch)` returns an iterable of micro-batches of epoch `epoch` starting at micro-batch
  `start_batch` (0-based). It must be deterministic in its arguments: on resume the loop calls it with the saved
  position and expects exactly the micro-batches an uninterrupted run would have seen there. The loop consumes
  `steps_per_epoch` micro-batches per epoch (every rank the same number) and never draws more; running out
  early is an error. Global RNG draws made while fetching (e.g. a DataLoader's base seed) are undone, so the
  loader cannot perturb the training RNG stream.
- A micro-batch is a tensor, or a dict/list/tuple of them (moved to the device recursively).
- `step_fn(model, batch) -> dict[str, Tensor]` (default: `model(batch)`) must call the model it is given (the
  DDP wrapper when distributed) and return 'loss' plus any other 0-d terms ('loss_fea', ...); every 0-d entry is
  logged (averaged over ranks, over the micro-batches of an optimizer step and over the `log_every` steps of a
  metrics row), other entries are ignored. Terms stay on the device between rows (`train.step.LossWindow`):
  no host sync per micro-batch; a non-finite loss is caught at the next row, before any checkpoint.
- Optimizer steps happen every `accum` micro-batches; an epoch's last group may be shorter (its loss is divided
  by its own size). The lr follows `schedule.lr_at` per optimizer step.
- Checkpoints (RUN/checkpoint.pth, always the latest; RUN/checkpoint-<epoch>.pth at epoch ends, the newest
  `keep_checkpoints` kept): {'model', 'optimizer', 'scaler', 'schedule', 'data_position' {'epoch', 'batch'},
  'rng' (one entry per rank), 'config' (`run_config` or `cfg`, plain), 'loop' (`cfg`, plain), 'version'} plus
  `checkpoint_extra` (e.g. 'arch', 'kind'). All load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tec_pipeline import __version__
from tec_pipeline.config import require, save_config, to_plain
from tec_pipeline.devices import resolve_device, threads_beside_workers
from tec_pipeline.errors import UserError
from tec_pipeline.logs import progress_enabled
from tec_pipeline.outputs import require_writable
from tec_pipeline.train import checkpoint as ckpt_io
from tec_pipeline.train import distributed as tdist
from tec_pipeline.train import run_dir as run_dirs
from tec_pipeline.train.metrics import EpochLog, MetricsLogger
from tec_pipeline.train.optim import build_optimizer
from tec_pipeline.train.schedule import (
    absolute_lr,
    apply_lr,
    effective_batch,
    lr_at_step,
    optimizer_steps_per_epoch,
)
from tec_pipeline.train.step import LossWindow, NonFiniteLossError, StepFn, optimizer_step, to_device

log = logging.getLogger(__name__)

Batch = Any
__all__ = ["LoopConfig", "NonFiniteLossError", "TrainResult", "amp_dtype", "run_training", "to_device"]
AMP_POLICIES = ("auto", "bf16", "fp16", "none")
RESERVED_KEYS = frozenset({"model", "optimizer", "scaler", "schedule", "data_position", "rng", "config", "loop",
                           "version"})


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation and bookkeeping of one training run. Derived values come from `train.schedule`."""

    epochs: int
    batch_size: int  # per rank, per micro-batch
    accum: int = 1
    blr: float = 1.5e-4  # lr = blr × effective batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0  # may be fractional
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    layer_decay: float | None = None  # set for fine-tuning: BEiT layer-wise lr decay groups
    clip_grad: float | None = None
    save_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0 = epoch ends only
    keep_checkpoints: int = 2  # checkpoint-<epoch>.pth files kept; 0 = all
    seed: int = 0  # each rank seeds torch/numpy/python with seed + rank
    amp: str = "auto"  # auto (bf16 autocast on CUDA, none on CPU) | bf16 | fp16 (with GradScaler) | none
    deterministic: bool = False
    resume: bool = True  # continue from RUN/checkpoint.pth when it exists
    device: str = "auto"  # auto = cuda:LOCAL_RANK if available, else cpu
    loader_workers: int = 0  # on CPU the model then computes on the cores the loader processes leave
    log_every: int = 1  # optimizer steps per loss reduction (one host sync) and metrics row; see train.step

    def __post_init__(self) -> None:
        # messages name the command-line flags, since that is where these values come from
        for name in ("epochs", "batch_size", "accum"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        require(self.blr > 0, f"--blr must be > 0, got {self.blr}")
        require(self.min_lr >= 0 and self.warmup_epochs >= 0 and self.weight_decay >= 0 and self.save_every >= 0,
                "--min-lr, --warmup-epochs, --weight-decay and --save-every must be >= 0")
        require(self.clip_grad is None or self.clip_grad > 0, f"--clip-grad must be > 0, got {self.clip_grad}")
        require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        require(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        require(self.amp in AMP_POLICIES, f"--amp must be one of {', '.join(AMP_POLICIES)}, got {self.amp!r}")


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimizer steps done over the whole run
    epochs_done: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    resumed_from: dict[str, int] | None = None  # the data position training resumed at, if it did


def amp_dtype(policy: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `policy` on `device` (None: full precision)."""
    if policy == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if policy == "none":
        return None
    if policy == "bf16":
        return torch.bfloat16
    if policy == "fp16":
        if device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA device; use bf16 or none on CPU")
        return torch.float16
    raise UserError(f"unknown amp policy {policy!r}; choose one of {', '.join(AMP_POLICIES)}")


def _default_step(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    return model(batch)


@dataclass
class _Run:
    """Mutable state of one run (the config stays frozen)."""

    cfg: LoopConfig
    model: nn.Module  # unwrapped
    wrapped: nn.Module  # DDP wrapper when distributed, else `model`
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    run_dir: Path
    micro_per_epoch: int
    steps_per_epoch: int  # optimizer steps
    lr: float
    rank: int
    world: int
    step: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)


def _checkpoint_payload(run: _Run, epoch: int, batch: int, extra: dict[str, Any], run_config: Any) -> dict:
    cfg = run.cfg
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "schedule": {"step": run.step, "steps_per_epoch": run.steps_per_epoch, "lr": run.lr,
                     "min_lr": cfg.min_lr, "warmup_epochs": cfg.warmup_epochs, "epochs": cfg.epochs},
        "data_position": {"epoch": epoch, "batch": batch, "micro_batches_per_epoch": run.micro_per_epoch,
                          "world_size": run.world},
        "rng": tdist.gather_objects(ckpt_io.rng_state()),
        "config": to_plain(run_config if run_config is not None else cfg),
        "loop": to_plain(cfg),
        "version": __version__,
        **extra,
    }


def _save(run: _Run, epoch: int, batch: int, extra: dict[str, Any], run_config: Any, epoch_end: bool) -> None:
    payload = _checkpoint_payload(run, epoch, batch, extra, run_config)  # collective: every rank calls it
    if run.rank == 0:
        latest = run.run_dir / ckpt_io.LATEST
        ckpt_io.save_atomic(payload, latest)
        if epoch_end:
            ckpt_io.copy_atomic(latest, run.run_dir / ckpt_io.epoch_checkpoint_name(epoch - 1))
            ckpt_io.prune_epoch_checkpoints(run.run_dir, run.cfg.keep_checkpoints)
    tdist.barrier()


def _restore(run: _Run, path: Path) -> dict[str, int]:
    """Load `path` into the run; returns the data position to continue from."""
    ck = ckpt_io.load_checkpoint(path)  # batch, accum, ranks, data etc. were checked with the run's identity
    pos, sched = ck["data_position"], ck["schedule"]
    run.model.load_state_dict(ck["model"], strict=True)
    run.optimizer.load_state_dict(ck["optimizer"])
    if run.scaler.is_enabled() and ck["scaler"]:
        run.scaler.load_state_dict(ck["scaler"])
    ckpt_io.set_rng_state(ck["rng"][run.rank])
    run.step = int(sched["step"])
    return {"epoch": int(pos["epoch"]), "batch": int(pos["batch"])}


def _run_epoch(run: _Run, batches: Callable[[int, int], Iterable[Batch]], epoch: int, start_batch: int,
               step_fn: StepFn, metrics: MetricsLogger, save: Callable[[int, int, bool], None],
               epoch_log: EpochLog) -> None:
    accum, micro = run.cfg.accum, run.micro_per_epoch
    with ckpt_io.preserved_rng():
        source = batches(epoch, start_batch)
        it = iter(source)
    bar = tqdm(total=micro, initial=start_batch, desc=f"epoch {epoch}", disable=not progress_enabled(run.rank == 0),
               dynamic_ncols=True, leave=False)
    window = LossWindow()

    def flush(batch_index: int) -> None:  # the only host sync of the loss terms: before every save, at log steps
        nonlocal window
        row = window.reduce(run.step, run.run_dir)
        window = LossWindow()
        if row is not None:
            run.last_metrics = {"step": run.step, "epoch": epoch + batch_index / micro, **row}
            metrics.log(run.last_metrics)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")

    try:
        batch_index = start_batch
        while batch_index < micro:
            group = min(accum, micro - batch_index)
            lr = lr_at_step(run.step, run.steps_per_epoch, run.lr, run.cfg.min_lr, run.cfg.warmup_epochs,
                            run.cfg.epochs)
            apply_lr(run.optimizer, lr)
            terms, wait = optimizer_step(run, it, group, step_fn, epoch)
            window.add(terms, epoch, lr, group * run.cfg.batch_size * run.world, wait)
            batch_index += group
            bar.update(group)
            saving = bool(run.cfg.save_every and run.step % run.cfg.save_every == 0 and batch_index < micro)
            if saving or run.step % run.cfg.log_every == 0 or batch_index == micro:
                flush(batch_index)
            if saving:
                save(epoch, batch_index, False)
    finally:
        bar.close()
        close = getattr(it, "close", None) or getattr(source, "close", None)
        if callable(close):
            close()
    save(epoch + 1, 0, True)
    epoch_log.epoch_done(epoch, run.step, run.last_metrics)


def _log_plan(run: _Run, total_steps: int, start: dict[str, int] | None) -> None:
    cfg = run.cfg
    eff = effective_batch(cfg.batch_size, cfg.accum, run.world)
    log.info("effective batch %d = %d per rank × accum %d × %d ranks; lr %.3g = blr %.3g × %d / 256",
             eff, cfg.batch_size, cfg.accum, run.world, run.lr, cfg.blr, eff)
    log.info("%d epochs × %d optimizer steps (%d micro-batches) = %d steps; warm-up %.3g epochs; device %s, "
             "autocast %s", cfg.epochs, run.steps_per_epoch, run.micro_per_epoch, total_steps, cfg.warmup_epochs,
             run.device, run.dtype or "off")
    if start is not None:
        log.info("resuming at epoch %d, micro-batch %d (optimizer step %d)", start["epoch"], start["batch"],
                 run.step)


def _build_run(model: nn.Module, steps_per_epoch: int, cfg: LoopConfig, run_dir: Path) -> _Run:
    if steps_per_epoch < 1 or cfg.accum < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise UserError(f"nothing to train: {steps_per_epoch} micro-batches per epoch, accum {cfg.accum}, "
                        f"{cfg.epochs} epochs, batch {cfg.batch_size}; check --limit, --batch-size and the shards")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    device = resolve_device(cfg.device)
    dtype = amp_dtype(cfg.amp, device)
    ckpt_io.seed_all(cfg.seed + rank)  # before anything stochastic; a resume overwrites it with saved states
    model.to(device)
    lr = absolute_lr(cfg.blr, effective_batch(cfg.batch_size, cfg.accum, world))
    optimizer = build_optimizer(model, lr, cfg.weight_decay, cfg.betas, cfg.layer_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    wrapped = model
    if tdist.is_distributed():
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Run(cfg, model, wrapped, optimizer, scaler, device, dtype, run_dir, steps_per_epoch,
                optimizer_steps_per_epoch(steps_per_epoch, cfg.accum), lr, rank, world)


@contextlib.contextmanager
def _determinism(on: bool, device: torch.device) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = not on and device.type == "cuda"
    if on:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _open_run_dir(run: _Run, spec: run_dirs.RunSpec, extra: dict[str, Any]) -> dict[str, int] | None:
    """Check the run directory holds this run (train.run_dir), then resume it or start (maybe from a parent)."""
    opened = run_dirs.open_run(run.run_dir, spec, run_dirs.loop_settings(run.cfg, run.world, run.micro_per_epoch,
                                                                          extra), run.cfg.resume, run.rank == 0)
    tdist.barrier()  # rank 0 may have cleared the directory
    if opened.resume:
        return _restore(run, run.run_dir / ckpt_io.LATEST)
    if opened.parent is not None:
        run_dirs.load_parent(run.model, run.optimizer, opened.parent, spec.init_optimizer)
    return None


def run_training(model: nn.Module, batches: Callable[[int, int], Iterable[Batch]], steps_per_epoch: int,
                 cfg: LoopConfig, run_dir: str | Path, checkpoint_extra: dict[str, Any] | None = None,
                 step_fn: StepFn | None = None, run_config: Any = None,
                 run_spec: run_dirs.RunSpec | None = None) -> TrainResult:
    """Train `model` in place for `cfg.epochs` epochs of `steps_per_epoch` micro-batches; see the module docstring.

    Writes RUN/config.yaml (`run_config` or `cfg`, as `run_dir.rerun_config` re-runs it), RUN/metrics.csv, RUN/run.json and the checkpoints (rank 0);
    `run_spec`: the run's identity (train.run_dir; default: `run_config`'s fields). Raises NonFiniteLossError
    on a NaN/inf loss, leaving the last good checkpoint in place.
    """
    run_dir = Path(run_dir)
    extra = dict(checkpoint_extra or {})
    if clash := RESERVED_KEYS & set(extra):
        raise ValueError(f"checkpoint_extra may not set {sorted(clash)}")
    require_writable(run_dir, "--out")
    run = _build_run(model, steps_per_epoch, cfg, run_dir)  # first: bad settings leave no run directory
    latest = run_dir / ckpt_io.LATEST
    start = _open_run_dir(run, run_spec or run_dirs.default_spec(run_config), extra)
    total_steps = cfg.epochs * run.steps_per_epoch
    if run.rank == 0:
        _log_plan(run, total_steps, start)
        save_config(run_dirs.rerun_config(run_config if run_config is not None else cfg), run_dir / "config.yaml")
    metrics = MetricsLogger(run_dir, enabled=run.rank == 0, resume_step=run.step if start else None)
    position = start or {"epoch": 0, "batch": 0}

    def save(epoch: int, batch: int, epoch_end: bool) -> None:
        _save(run, epoch, batch, extra, run_config, epoch_end)

    epoch_log = EpochLog(cfg.epochs, run.steps_per_epoch, run.step, enabled=run.rank == 0 and not progress_enabled(True))
    model.train()
    try:
        with _determinism(cfg.deterministic, run.device), threads_beside_workers(run.device, cfg.loader_workers):
            for epoch in range(position["epoch"], cfg.epochs):
                _run_epoch(run, batches, epoch, position["batch"] if epoch == position["epoch"] else 0,
                           step_fn or _default_step, metrics, save, epoch_log)
    finally:
        metrics.close()
    return TrainResult(run.step, cfg.epochs, dict(run.last_metrics), latest if latest.exists() else None, start)
