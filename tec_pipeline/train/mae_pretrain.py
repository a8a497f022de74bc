"""`tec mae-pretrain` as a library call: plain MAE on fresh views of the shards, through the shared loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_pipeline.config import require
from tec_pipeline.errors import UserError
from tec_pipeline.models.mae import MAEConfig, MaskedAutoencoder, checkpoint_extra, mae_step
from tec_pipeline.models.vit import ViTArch, plain_arch, resolve_arch
from tec_pipeline.train.checkpoint import seed_all
from tec_pipeline.train.loop import LoopConfig, TrainResult, run_training
from tec_pipeline.train.run_dir import run_spec


@dataclass(frozen=True)
class MAEPretrainConfig:
    """Options of `tec mae-pretrain` (MAE's recipe: blr 1.5e-4, wd 0.05, betas (0.9, 0.95), mask 0.75)."""

    shards: str
    out: str
    model: str = "tec_tiny_p4_28"
    epochs: int = 400
    batch_size: int = 64
    accum: int = 1
    blr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    decoder_depth: int | None = None  # None: 8 for ViT-B and larger, 4 below
    norm_pix_loss: bool = True
    clip_grad: float | None = None
    seed: int = 0
    save_every: int = 0
    workers: int = 0
    limit: int | None = None
    resume: bool = True
    overwrite: bool = False  # --out holds another run: clear it first
    init_from: str | None = None  # a new run from this checkpoint's weights (train.run_dir)
    init_optimizer: bool = False  # ... and its optimizer state
    amp: str = "auto"
    deterministic: bool = False


def arch_of(name: str) -> ViTArch:
    """The MAE encoder for --model: a plain ViT of that preset's or timm model's sizes (MAE's blocks are plain)."""
    try:
        return plain_arch(resolve_arch(name))
    except ValueError as e:
        raise UserError(str(e)) from None


def loop_config(cfg: MAEPretrainConfig) -> LoopConfig:
    return LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, accum=cfg.accum, blr=cfg.blr,
                      min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay,
                      betas=(0.9, 0.95), clip_grad=cfg.clip_grad, save_every=cfg.save_every, seed=cfg.seed,
                      amp=cfg.amp, deterministic=cfg.deterministic, resume=cfg.resume,
                      loader_workers=cfg.workers)


def pretrain_mae(cfg: MAEPretrainConfig, rank: int = 0, world_size: int = 1) -> TrainResult:
    """Train a plain MAE on `cfg.shards` into run directory `cfg.out` (resuming when a checkpoint is there)."""
    from tec_pipeline.data.loader import fresh_view_batches, steps_per_epoch
    from tec_pipeline.data.shards import load_manifest

    require(0.0 <= cfg.mask_ratio < 1.0, f"--mask-ratio must be in [0, 1), got {cfg.mask_ratio}")
    require(cfg.decoder_depth is None or cfg.decoder_depth >= 1, "--decoder-depth must be >= 1")
    require(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    loop = loop_config(cfg)  # validates the loop options before anything reads the shards
    arch = arch_of(cfg.model)
    mae_cfg = MAEConfig(mask_ratio=cfg.mask_ratio, decoder_depth=cfg.decoder_depth, norm_pix_loss=cfg.norm_pix_loss)
    seed_all(cfg.seed)  # the same initial weights on every rank and every run with this seed
    model = MaskedAutoencoder(arch, mae_cfg)
    manifest = load_manifest(cfg.shards)
    steps = steps_per_epoch(cfg.shards, cfg.batch_size, world_size, cfg.workers, cfg.limit, manifest)

    def batches(epoch: int, start: int) -> Iterator[dict[str, Any]]:
        return fresh_view_batches(cfg.shards, arch.img_size, cfg.batch_size, cfg.seed, epoch, start, rank,
                                  world_size, cfg.workers, cfg.limit)

    # the saved config and the identity record what was built, so re-running from RUN/config.yaml is this run
    resolved = dataclasses.replace(cfg, model=arch.name, decoder_depth=mae_cfg.resolved(arch).decoder_depth)
    return run_training(model, batches, steps, loop, Path(cfg.out), checkpoint_extra(arch, mae_cfg),
                        step_fn=mae_step, run_config=resolved,
                        run_spec=run_spec(resolved, {"shards": manifest.fingerprint}))

