"""Stage 2: train a TEC student from cached targets (`--targets STORE`) or online (`--base-model CKPT`).

Both modes run the same loop on the same streaming loader. Cached mode replays each epoch's stored view
(default: view = epoch mod V) and reads that view's target rows; online mode samples fresh views with
view id = epoch and computes the targets in the step, exactly as stage 1 does, so for the first V epochs the
two modes see identical pixels and targets.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tec_pipeline.config import require
from tec_pipeline.data.loader import DEFAULT_SHUFFLE_BUFFER, steps_per_epoch, valid_rows_per_unit
from tec_pipeline.data.shards import Manifest, load_manifest
from tec_pipeline.data.views import replay_mismatch
from tec_pipeline.errors import UserError
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.student import TECStudent
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.models.vit import ViTArch, at_input_size, plain_arch, resolve_arch
from tec_pipeline.stage2.cached import TARGET_KEYS
from tec_pipeline.stage2.epochs import VIEW_POLICIES, EpochItems, StreamSpec, TrainingBatches, valid_masks
from tec_pipeline.store.integrity import store_fingerprint
from tec_pipeline.store.target_store import TargetStore
from tec_pipeline.train import distributed as tdist
from tec_pipeline.train.loop import AMP_POLICIES, LoopConfig, TrainResult, run_training
from tec_pipeline.train.run_dir import run_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    shards: str
    out: str
    targets: str | None = None
    base_model: str | None = None
    base_arch: str | None = None
    model: str | None = None  # student architecture (preset or timm ViT name); default: the base model's sizes
    input_size: int | None = None  # the student's input size (online mode: the base model's too)
    decoder_depth: int | None = None  # TEC decoder: default the architecture's (2 blocks, width 512 for ViT-B)
    decoder_dim: int | None = None
    decoder_heads: int | None = None
    decoder_mlp_ratio: float | None = None
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
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # rows per loader worker, held in compact form
    seed: int = 0
    view_seed: int | None = None  # online: views drawn with it (default --seed); cached: must be the store's
    log_every: int = 10  # optimizer steps between loss reductions (one host sync each) and metrics rows
    amp: str = "auto"
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
    # Any width, depth and heads: the decoder heads predict at the store's D and H (spec §3.6b). Only the patch
    # grid must agree; the student replays the stored boxes at its own input size.
    if spec.patches != arch.num_patches:
        side = round(spec.patches**0.5)
        reasons.append(f"its patch grid is {side}x{side} ({attrs['base_model']['input_size']} px), the student "
                       f"{arch.name} has {arch.grid_size}x{arch.grid_size} at {arch.img_size} px (pass "
                       f"--input-size {side * arch.patch_size} or another --model)")
    if replay := replay_mismatch(attrs["views"]):  # stage 2 replays the stored boxes: same pixels or refuse
        reasons.append(replay)
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
    require(cfg.shuffle_buffer >= 1, f"--shuffle-buffer must be >= 1, got {cfg.shuffle_buffer}")
    require(cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}")
    require(cfg.amp in AMP_POLICIES, f"--amp must be one of {', '.join(AMP_POLICIES)}, got {cfg.amp!r}")


def view_seed(cfg: PretrainConfig, store: TargetStore | None) -> int:
    """The seed the run's views come from: the store's (cached; a different --view-seed is refused) or
    --view-seed, by default --seed (online)."""
    if store is None:
        return cfg.seed if cfg.view_seed is None else cfg.view_seed
    stored = int(store.attrs["views"]["seed"])
    require(cfg.view_seed is None or cfg.view_seed == stored,
            f"--view-seed {cfg.view_seed} differs from the view seed {stored} of {cfg.targets}: cached mode replays "
            "the store's views; drop --view-seed, or pass the store's to compare with an online run")
    return stored


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
    """The student: a plain ViT sized as --model (default: the base model) at --input-size, with the decoder
    flags applied. Raises UserError for an unknown or unsupported --model and an impossible decoder."""
    try:
        arch = at_input_size(resolve_arch(cfg.model) if cfg.model else base_arch, cfg.input_size)
    except ValueError as e:  # an unknown --model is bad input, not a crash
        raise UserError(str(e)) from None
    decoder = {"decoder_depth": cfg.decoder_depth, "decoder_embed_dim": cfg.decoder_dim,
               "decoder_num_heads": cfg.decoder_heads, "decoder_mlp_ratio": cfg.decoder_mlp_ratio}
    arch = dataclasses.replace(plain_arch(arch), **{k: v for k, v in decoder.items() if v is not None})
    require(arch.decoder_depth >= 1 and arch.decoder_mlp_ratio > 0, "--decoder-depth must be >= 1 and "
            "--decoder-mlp-ratio > 0")
    require(arch.decoder_embed_dim % 4 == 0 and arch.decoder_embed_dim % arch.decoder_num_heads == 0,
            f"--decoder-dim {arch.decoder_embed_dim} must be a multiple of 4 (sin-cos embedding) and of "
            f"--decoder-heads {arch.decoder_num_heads}")
    require(arch.embed_dim % 4 == 0, f"the student's width {arch.embed_dim} must be a multiple of 4 (sin-cos "
            "pos_embed)")
    return arch


def resolved_config(cfg: PretrainConfig, arch: ViTArch, k: int, last_layers: int, views: int | None,
                    seed_of_views: int) -> PretrainConfig:
    """`cfg` with each default that the inputs decide replaced by what was built (student, decoder, k, view
    seed, ...): RUN/config.yaml and the run's identity record these, so re-running from config.yaml, or with
    the resolved values spelled out, is the same job and resumes the same run."""
    return dataclasses.replace(cfg, model=arch.name, input_size=arch.img_size, decoder_depth=arch.decoder_depth,
                               decoder_dim=arch.decoder_embed_dim, decoder_heads=arch.decoder_num_heads,
                               decoder_mlp_ratio=arch.decoder_mlp_ratio, topk=k, last_layers=last_layers,
                               views=views, view_seed=seed_of_views)


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    """Check everything, then train; raises UserError before any step when the inputs do not fit together."""
    _validate(cfg)
    manifest = load_manifest(cfg.shards)
    rank, world = tdist.init_distributed(cfg.device)
    base, store = None, None
    content = {"shards": manifest.fingerprint}  # the run's identity records inputs by content (train.run_dir)
    if cfg.targets is not None:
        store = TargetStore.open(cfg.targets)
        content["targets"] = store_fingerprint(store)
        arch = _student_arch(cfg, ViTArch.from_dict(store.attrs["base_model"]["arch"]))
        k, pred = cfg.topk or store.spec.k, (store.spec.dim, store.spec.heads)
        reasons = store_mismatches(store, manifest, arch, k, cfg.allow_partial)
        require(not reasons, f"cannot train from {cfg.targets}: " + "; ".join(reasons))
        rows, last_layers, views = store.spec.rows, store.attrs["targets"]["last_layers"], store.spec.views
        require(cfg.views is None or 1 <= cfg.views <= views, f"--views must be in 1..{views} (the store's V)")
        views = cfg.views or views
    else:
        base, ckpt = load_encoder(cfg.base_model, cfg.base_arch, input_size=cfg.input_size)
        content["base_model"] = ckpt.sha256
        arch, k = _student_arch(cfg, ckpt.arch), cfg.topk or 15
        pred = (ckpt.arch.embed_dim, ckpt.arch.num_heads)
        require(arch.img_size == ckpt.arch.img_size, f"online mode feeds one image to both models: the student "
                f"{arch.name} runs at {arch.img_size} px, the base model at {ckpt.arch.img_size} px (set --input-size)")
        require(arch.num_patches == ckpt.arch.num_patches, f"the student {arch.name} has {arch.num_patches} "
                f"patches, the base model {ckpt.arch.num_patches}: the patch grids must agree")
        require(k <= arch.num_patches, f"--topk {k} exceeds the {arch.num_patches} patches")
        rows, last_layers, views = manifest.total_rows, cfg.last_layers, 1
    rows = rows if cfg.limit is None else min(rows, cfg.limit)
    seed_of_views = view_seed(cfg, store)
    resolved = resolved_config(cfg, arch, k, last_layers, views if store is not None else cfg.views, seed_of_views)
    torch.manual_seed(cfg.seed)  # the student's initialisation is part of the run's identity (exact resume)
    model = TECStudent(arch, k=k, mask_ratio=cfg.mask_ratio, mlp_token=cfg.mlp_token, pred_att=cfg.pred_att,
                       att_tau=cfg.att_tau, pred_dim=pred[0], pred_heads=pred[1])
    items = EpochItems(arch.img_size, seed_of_views, cfg.targets, views, cfg.view_policy)
    spec = _stream_spec(cfg, manifest, items, rows, rank, world)
    steps = steps_per_epoch(cfg.shards, cfg.batch_size, world, cfg.workers, rows, manifest, spec.valid_per_unit)
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, accum=cfg.accum, blr=cfg.blr,
                      min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay,
                      save_every=cfg.save_every, seed=cfg.seed, resume=cfg.resume, device=cfg.device,
                      deterministic=cfg.deterministic, loader_workers=cfg.workers, amp=cfg.amp,
                      log_every=cfg.log_every)
    extra = {"arch": arch.to_dict(), "kind": "tec", "mode": "cached" if store is not None else "online",
             "prediction": {"dim": pred[0], "heads": pred[1]}, "view_seed": seed_of_views}
    log.info("TEC %s pretraining of %s: %d rows, k=%d, view seed %d, %d micro-batches/epoch on rank %d of %d",
             extra["mode"], arch.name, rows, k, seed_of_views, steps, rank, world)
    step = _Step(cfg.masks_per_view, base, k, last_layers)
    batches = TrainingBatches(spec, steps)
    try:
        return run_training(model, batches, steps, loop, cfg.out, extra, step_fn=step, run_config=resolved,
                            run_spec=run_spec(resolved, content))
    finally:
        batches.close()


def _stream_spec(cfg: PretrainConfig, manifest: Manifest, items: EpochItems, rows: int, rank: int,
                 world: int) -> StreamSpec:
    """The run's loader settings; cached mode cuts every epoch into pieces of equally many valid rows."""
    masks = valid_masks(items, cfg.epochs)
    per_unit = None if masks is None else valid_rows_per_unit(list(masks.values()), rows, world * max(cfg.workers, 1))
    return StreamSpec(cfg.shards, manifest, items, cfg.batch_size, cfg.seed, cfg.epochs, rank, world, cfg.workers,
                      rows, cfg.shuffle_buffer, per_unit)
