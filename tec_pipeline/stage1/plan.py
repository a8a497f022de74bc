"""Stage-1 planning: the store's spec and identity attributes, chunk groups, and each rank's share of them.

A chunk group is every pending task of one chunk (same rows, any views): one read and decode of its images
serves all of them, so groups, not tasks, are what executors and ranks divide among themselves.
"""

from __future__ import annotations

import math
from typing import Any

import tec_pipeline
from tec_pipeline.config import require
from tec_pipeline.data.shards import Manifest
from tec_pipeline.data.views import view_constants
from tec_pipeline.models.base import EncoderCheckpoint
from tec_pipeline.models.targets import TARGETS_IMPLEMENTATION
from tec_pipeline.stage1.config import CacheConfig
from tec_pipeline.store.layout import StoreSpec, Task

FEATURE_NORMALISATION = "per-image-channel across patches, unbiased var, eps 1e-6"
# store attributes that may differ on a resume: the checkpoint's path is a hint, its content (sha256 + arch)
# is the identity (a moved file, or the same file named by an absolute path, is the same base model)
RESUMABLE_ATTRS = frozenset({"base_model.source"})
SPACE_MARGIN = 1.05  # metadata, claims and filesystem blocks on top of the codec's estimate


def store_spec(cfg: CacheConfig, ckpt: EncoderCheckpoint, rows: int) -> StoreSpec:
    arch = ckpt.arch
    require(cfg.topk <= arch.num_patches, f"--topk {cfg.topk} exceeds the {arch.num_patches} patches of {arch.name}")
    require(cfg.last_layers <= arch.depth, f"--last-layers {cfg.last_layers} exceeds the depth {arch.depth}")
    return StoreSpec(views=cfg.views, rows=rows, patches=arch.num_patches, dim=arch.embed_dim,
                     heads=arch.num_heads, k=cfg.topk, chunk_rows=cfg.chunk_rows, codec=cfg.codec)


def store_attributes(cfg: CacheConfig, manifest: Manifest, ckpt: EncoderCheckpoint, rows: int,
                     precision: dict[str, str]) -> dict[str, Any]:
    """The `tec` group attributes: everything a later stage needs to trust (or refuse) the store.

    precision: {'autocast': 'bf16'|'fp16'|'none', 'device_type': 'cuda'|'cpu'} actually used by the forward.
    """
    arch = ckpt.arch
    return {
        "base_model": {"source": str(cfg.base_model), "format": ckpt.fmt, "sha256": ckpt.sha256,
                       "arch": arch.to_dict(), "embed_dim": arch.embed_dim, "depth": arch.depth,
                       "num_heads": arch.num_heads, "patch_size": arch.patch_size, "input_size": arch.img_size},
        "targets": {"last_layers": cfg.last_layers, "k": cfg.topk, "feature_normalisation": FEATURE_NORMALISATION,
                    "codec": cfg.codec, "precision": precision, "implementation": TARGETS_IMPLEMENTATION},
        "views": {"count": cfg.views, **view_constants(arch.img_size, cfg.seed, replay=cfg.replay)},
        "data": {"fingerprint": manifest.fingerprint, "rows": rows, "split": manifest.split,
                 "source": manifest.source, "limit": cfg.limit},
        "package_version": tec_pipeline.__version__,
    }


def chunk_groups(tasks: list[Task]) -> list[list[Task]]:
    """Tasks grouped by chunk (row range), chunks in row order: one read and decode then serves every view."""
    groups: dict[int, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.index, []).append(task)
    return [sorted(groups[index], key=lambda t: t.view) for index in sorted(groups)]


def rank_share(groups: list[list[Task]], rank: int, world: int) -> list[list[Task]]:
    """Rank `rank`'s deterministic, disjoint share of `groups`: every world-th group from `rank` on.

    Interleaved (not contiguous blocks) so that ranks finish together when chunk cost varies with position
    (the last chunk is short; shards of one class may decode slower). A rank beyond the groups gets none.
    """
    return groups[rank::world]


def estimated_bytes(spec: StoreSpec, tasks: list[Task]) -> int:
    """Upper estimate of the bytes `tasks` will add: every array's raw (uncompressed) size in whole chunks (a
    ragged last chunk is stored full size); the feature and attention arrays, nearly all of a store, are not
    compressed, so the estimate is close to what the tasks take."""
    per_row = 0
    for layout, _, _ in spec.arrays()[:-1]:
        per_row += math.prod(layout.trailing) * _itemsize(layout.dtype)
    return int(SPACE_MARGIN * per_row * spec.chunk_rows * len(tasks))


def _itemsize(dtype: str) -> int:
    return {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "float16": 2, "int32": 4, "float32": 4}[dtype]


