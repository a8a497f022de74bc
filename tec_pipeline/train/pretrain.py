"""Stage 2: train a TEC student from cached targets (`--targets STORE`) or online (`--base-model CKPT`).

Both modes run the same loop on the same streaming loader. Cached mode replays each epoch's stored view
(default: view = epoch mod V) and reads that view's target rows; online mode samples fresh views with
view id = epoch and computes the targets in the step, exactly as stage 1 does, so for the first V epochs the
two modes see identical pixels and targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tec_pipeline.config import require
from tec_pipeline.data.cached import TARGET_KEYS, CachedViews
from tec_pipeline.data.loader import FreshViews, normalized, steps_per_epoch, stream_epoch
from tec_pipeline.data.shards import Manifest, load_manifest
from tec_pipeline.errors import UserError
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.student import TECStudent
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.models.vit import ViTArch, resolve_arch
from tec_pipeline.store.integrity import store_fingerprint
from tec_pipeline.store.layout import TargetStore
from tec_pipeline.train import distributed as tdist
from tec_pipeline.train.loop import LoopConfig, TrainResult, run_training
from tec_pipeline.train.run_dir import run_spec

log = logging.getLogger(__name__)
VIEW_POLICIES = ("cycle", "first")


@dataclass(frozen=True)
class PretrainConfig:
    shards: str
    out: str
    targets: str | None = None
    base_model: str | None = None
    base_arch: str | None = None
    model: str | None = None  # student architecture; default: the base model's
    epochs: int = 10
    batch_size: int = 64
    accum: int = 1
    blr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    att_tau: float = 1.8
    topk: int | None = None  # default: the store's k (cached) or 15 (online)
    last_layers: int = 2  # online mode only; cached mode uses the store's
    view_policy: str = "cycle"  # cycle: view = epoch mod V; first: always view 0
    views: int | None = None  # use only the store's first N views (default: all V)
    masks_per_view: int = 1
    workers: int = 0
    seed: int = 0
    save_every: int = 0
    resume: bool = True
    overwrite: bool = False  # --out holds another run: clear it first
    init_from: str | None = None  # a new run from this checkpoint's weights (train.run_dir)
    init_optimizer: bool = False  # ... and its optimizer state
    allow_partial: bool = False
    limit: int | None = None
    device: str = "auto"
    deterministic: bool = False
    mlp_token: bool = True
    pred_att: bool = True


def store_mismatches(store: TargetStore, manifest: Manifest, arch: ViTArch, k: int, allow_partial: bool) -> list[str]:
    """Why `store` cannot train `arch` on these shards (empty when it can)."""
    spec, attrs = store.spec, store.attrs
    reasons = []
    if attrs["data"]["fingerprint"] != manifest.fingerprint:
        reasons.append(f"it was made from other shards (fingerprint {attrs['data']['fingerprint'][:12]} vs "
                       f"{manifest.fingerprint[:12]} of --shards)")
    checks = [("input size", attrs["base_model"]["input_size"], arch.img_size),
              ("patch count", spec.patches, arch.num_patches), ("embed dim", spec.dim, arch.embed_dim),
              ("heads", spec.heads, arch.num_heads)]
    reasons += [f"its {what} is {have}, the student {arch.name} needs {need}" for what, have, need in checks
                if have != need]
    if k > spec.k:
        reasons.append(f"it holds top-{spec.k} attention rows, --topk {k} needs more")
    pending = store.pending_tasks()
    if pending and not allow_partial:
        reasons.append(f"{len(pending)} of {len(store.tasks())} tasks are unfinished (rerun cache-targets, or pass "
                       "--allow-partial to train on finished rows only)")
    return reasons


def _validate(cfg: PretrainConfig) -> None:
    require((cfg.targets is None) != (cfg.base_model is None), "give exactly one of --targets STORE (cached) or "
            "--base-model CKPT (online)")
    require(cfg.view_policy in VIEW_POLICIES, f"--view-policy must be one of {', '.join(VIEW_POLICIES)}")
    for name in ("epochs", "batch_size", "accum", "masks_per_view"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    require(0.0 < cfg.mask_ratio < 1.0, f"--mask-ratio must be in (0, 1): the feature loss counts masked patches, got {cfg.mask_ratio}")
    require(cfg.att_tau > 0, f"--att-tau must be > 0, got {cfg.att_tau}")
    require(cfg.blr > 0, f"--blr must be > 0, got {cfg.blr}")
    require(cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")


class _Step:
    """step_fn for the loop: student losses on a batch; online mode first computes the targets."""

    def __init__(self, masks_per_view: int, base: nn.Module | None, k: int, last_layers: int) -> None:
        self.masks_per_view, self.base, self.k, self.last_layers = masks_per_view, base, k, last_layers

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]
        if self.base is None:
            targets = {key: batch[key] for key in TARGET_KEYS}
        else:
            self.base.to(images.device)
            with torch.no_grad():
                targets = stored_targets(self.base, images, self.k, self.last_layers)
        out = model(images, targets, masks_per_view=self.masks_per_view)
        return {key: value for key, value in out.items() if key.startswith("loss")}


def _student_arch(cfg: PretrainConfig, base_arch: ViTArch) -> ViTArch:
    if not cfg.model:
        return base_arch
    try:
        return resolve_arch(cfg.model)
    except ValueError as e:  # an unknown --model is bad input, not a crash
        raise UserError(str(e)) from None


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    """Check everything, then train; raises UserError before any step when the inputs do not fit together."""
    _validate(cfg)
    manifest = load_manifest(cfg.shards)
    rank, world = tdist.init_distributed()
    base, store = None, None
    content = {"shards": manifest.fingerprint}  # the run's identity records inputs by content (train.run_dir)
    if cfg.targets is not None:
        store = TargetStore.open(cfg.targets)
        content["targets"] = store_fingerprint(store)
        arch = _student_arch(cfg, ViTArch.from_dict(store.attrs["base_model"]["arch"]))
        k = cfg.topk or store.spec.k
        reasons = store_mismatches(store, manifest, arch, k, cfg.allow_partial)
        require(not reasons, f"cannot train from {cfg.targets}: " + "; ".join(reasons))
        rows, last_layers, views = store.spec.rows, store.attrs["targets"]["last_layers"], store.spec.views
        require(cfg.views is None or 1 <= cfg.views <= views, f"--views must be in 1..{views} (the store's V)")
        views = cfg.views or views
    else:
        base, ckpt = load_encoder(cfg.base_model, cfg.base_arch)
        content["base_model"] = ckpt.sha256
        arch, k = _student_arch(cfg, ckpt.arch), cfg.topk or 15
        require(arch.embed_dim == ckpt.arch.embed_dim and arch.num_heads == ckpt.arch.num_heads
                and arch.img_size == ckpt.arch.img_size, f"student {arch.name} and base model {ckpt.arch.name} "
                "differ in width, heads or input size (TEC predicts the base model's targets at its width)")
        require(k <= arch.num_patches, f"--topk {k} exceeds the {arch.num_patches} patches")
        rows, last_layers, views = manifest.total_rows, cfg.last_layers, None
    rows = rows if cfg.limit is None else min(rows, cfg.limit)
    torch.manual_seed(cfg.seed)  # the student's initialisation is part of the run's identity (exact resume)
    model = TECStudent(arch, k=k, mask_ratio=cfg.mask_ratio, mlp_token=cfg.mlp_token, pred_att=cfg.pred_att,
                       att_tau=cfg.att_tau)
    steps = steps_per_epoch(cfg.shards, cfg.batch_size, world, cfg.workers, rows, manifest)

    def batches(epoch: int, start_batch: int) -> Any:
        if store is not None:
            view = epoch % views if cfg.view_policy == "cycle" else 0
            item_fn: Any = CachedViews(cfg.targets, view, arch.img_size)
        else:
            item_fn = FreshViews(arch.img_size, cfg.seed, epoch)
        return normalized(stream_epoch(cfg.shards, item_fn, cfg.batch_size, cfg.seed, epoch, start_batch,
                                       tdist.get_rank(), tdist.get_world_size(), cfg.workers, rows, manifest))

    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, accum=cfg.accum, blr=cfg.blr,
                      min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay,
                      save_every=cfg.save_every, seed=cfg.seed, resume=cfg.resume, device=cfg.device,
                      deterministic=cfg.deterministic, loader_workers=cfg.workers)
    extra = {"arch": arch.to_dict(), "kind": "tec", "mode": "cached" if store is not None else "online"}
    log.info("TEC %s pretraining of %s: %d rows, k=%d, %d micro-batches/epoch on rank %d of %d",
             extra["mode"], arch.name, rows, k, steps, rank, world)
    step = _Step(cfg.masks_per_view, base, k, last_layers)
    return run_training(model, batches, steps, loop, cfg.out, extra, step_fn=step, run_config=cfg,
                        run_spec=run_spec(cfg, content))
