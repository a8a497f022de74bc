"""Stage 1: run the frozen base model once over V views of every image and fill the target store.

Work is split into tasks = (view, chunk row-range) planned from the manifest; each task is computed and written
by exactly one owner, whole chunks only, and marked done after its data, so tasks can run in any order, on any
worker, any number of times, and a rerun skips what is finished. Executors: in-process (a DataLoader decodes and
replays views in worker processes while the main process runs the model; the pending views of one chunk share
one read and decode of its images) or dask.distributed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import tec_pipeline
from tec_pipeline.config import require, to_plain
from tec_pipeline.data.shards import Manifest, iter_samples, load_manifest
from tec_pipeline.data.views import normalize, replay_view_uint8, sample_view, view_constants
from tec_pipeline.devices import resolve_device, threads_beside_workers
from tec_pipeline.models.base import EncoderCheckpoint, load_encoder
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.outputs import require_free_space
from tec_pipeline.progress import ProgressLog
from tec_pipeline.store.codecs import get_codec
from tec_pipeline.store.integrity import pending_bytes
from tec_pipeline.store.layout import StoreSpec, TargetStore, Task

log = logging.getLogger(__name__)
FEATURE_NORMALISATION = "per-image-channel across patches, unbiased var, eps 1e-6"


@dataclass(frozen=True)
class CacheConfig:
    shards: str
    base_model: str
    out: str
    base_arch: str | None = None
    views: int = 2
    topk: int = 15
    last_layers: int = 2
    codec: str = "fp16"
    chunk_rows: int = 256
    batch_size: int = 64
    seed: int = 0
    limit: int | None = None
    workers: int = 0
    scheduler: str | None = None
    loader_workers: int = 1
    device: str = "auto"


@dataclass(frozen=True)
class TaskInputs:
    """Decoded views of one task: pixels uint8 [n,3,S,S], boxes int32 [n,5], valid bool [n]."""

    task: Task
    pixels: torch.Tensor
    boxes: np.ndarray
    valid: np.ndarray


def validate_config(cfg: CacheConfig) -> None:
    require(cfg.views >= 1, f"--views must be >= 1, got {cfg.views}")
    require(cfg.topk >= 1, f"--topk must be >= 1, got {cfg.topk}")
    require(cfg.last_layers >= 1, f"--last-layers must be >= 1, got {cfg.last_layers}")
    require(cfg.chunk_rows >= 1, f"--chunk-rows must be >= 1, got {cfg.chunk_rows}")
    require(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    require(cfg.limit is None or cfg.limit >= 1, f"--limit must be >= 1, got {cfg.limit}")
    require(cfg.workers >= 0 and cfg.loader_workers >= 0, "--workers must be >= 0")
    get_codec(cfg.codec)


def store_attributes(cfg: CacheConfig, manifest: Manifest, ckpt: EncoderCheckpoint, rows: int) -> dict[str, Any]:
    """The `tec` group attributes: everything a later stage needs to trust (or refuse) the store."""
    arch = ckpt.arch
    return {
        "base_model": {"source": str(cfg.base_model), "format": ckpt.fmt, "sha256": ckpt.sha256,
                       "arch": arch.to_dict(), "embed_dim": arch.embed_dim, "depth": arch.depth,
                       "num_heads": arch.num_heads, "patch_size": arch.patch_size, "input_size": arch.img_size},
        "targets": {"last_layers": cfg.last_layers, "k": cfg.topk, "feature_normalisation": FEATURE_NORMALISATION,
                    "codec": cfg.codec, "precision": "fp32 on CPU; autocast bf16 on CUDA"},
        "views": {"count": cfg.views, **view_constants(arch.img_size, cfg.seed)},
        "data": {"fingerprint": manifest.fingerprint, "rows": rows, "split": manifest.split,
                 "source": manifest.source, "limit": cfg.limit},
        "package_version": tec_pipeline.__version__,
    }


def decode_tasks(shards_dir: str, manifest: Manifest, tasks: list[Task], seed: int, img_size: int) -> list[TaskInputs]:
    """Tasks of one chunk (same rows, any views): read and decode each image once, then sample and replay every
    task's view box on it. Returns one TaskInputs per task, in the order given."""
    start, stop = tasks[0].row_start, tasks[0].row_stop
    if any((t.row_start, t.row_stop) != (start, stop) for t in tasks):
        raise ValueError(f"tasks of different row ranges cannot share a decode: {tasks}")
    n = stop - start
    pixels = torch.zeros(len(tasks), n, 3, img_size, img_size, dtype=torch.uint8)
    boxes = np.zeros((len(tasks), n, 5), dtype=np.int32)
    valid = np.zeros(n, dtype=bool)
    for sample in iter_samples(shards_dir, start, stop, manifest):
        if sample.image is None:
            continue
        i = sample.row - start
        for j, task in enumerate(tasks):
            box = sample_view(seed, sample.row, task.view, *sample.image.size)
            pixels[j, i] = replay_view_uint8(sample.image, box, img_size)
            boxes[j, i] = box.as_array()
        valid[i] = True
    return [TaskInputs(task, pixels[j], boxes[j], valid.copy()) for j, task in enumerate(tasks)]


def decode_task(shards_dir: str, manifest: Manifest, task: Task, seed: int, img_size: int) -> TaskInputs:
    """Read the task's rows sequentially, sample each row's view box and replay it."""
    return decode_tasks(shards_dir, manifest, [task], seed, img_size)[0]


def chunk_groups(tasks: list[Task]) -> list[list[Task]]:
    """Tasks grouped by chunk (row range), chunks in row order: one read and decode then serves every view."""
    groups: dict[int, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.index, []).append(task)
    return [groups[index] for index in sorted(groups)]


def compute_task(model: torch.nn.Module, inputs: TaskInputs, k: int, last_layers: int, batch_size: int,
                 device: torch.device) -> dict[str, np.ndarray]:
    """Targets of one task as float32/int numpy arrays, features normalised; invalid rows are zero."""
    outs: dict[str, list[np.ndarray]] = {"features": [], "attention": [], "topk_index": []}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, len(inputs.pixels), batch_size):
        x = normalize(inputs.pixels[start:start + batch_size]).to(device, non_blocking=True)
        with autocast:
            t = stored_targets(model, x, k, last_layers)
        for name in outs:
            outs[name].append(t[name].cpu().numpy())
    result = {name: np.concatenate(parts) for name, parts in outs.items()}
    for name in result:
        result[name][~inputs.valid] = 0
    return {**result, "boxes": inputs.boxes, "valid": inputs.valid}


class _ChunkDataset(Dataset):
    """Item i: the decoded inputs of every task of chunk group i (decoded in a loader worker)."""

    def __init__(self, cfg: CacheConfig, manifest: Manifest, groups: list[list[Task]], img_size: int) -> None:
        self.cfg, self.manifest, self.groups, self.img_size = cfg, manifest, groups, img_size

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[TaskInputs]:
        return decode_tasks(self.cfg.shards, self.manifest, self.groups[i], self.cfg.seed, self.img_size)


def _decoded_tasks(cfg: CacheConfig, manifest: Manifest, tasks: list[Task], img_size: int) -> Iterator[TaskInputs]:
    """Every task's inputs, chunk by chunk: the V views of a chunk share one read and decode of its images."""
    dataset = _ChunkDataset(cfg, manifest, chunk_groups(tasks), img_size)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.loader_workers, collate_fn=lambda x: x,
                        prefetch_factor=2 if cfg.loader_workers else None)
    for group in loader:
        yield from group


def run_in_process(cfg: CacheConfig, store: TargetStore, model: torch.nn.Module, manifest: Manifest,
                   tasks: list[Task], progress: bool) -> int:
    device = resolve_device(cfg.device)
    model.to(device)
    img_size = store.attrs["base_model"]["input_size"]
    images, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(tasks), desc="cache-targets", unit="task", disable=not progress)
    lines = ProgressLog("cache-targets", len(tasks), "tasks", enabled=not progress)  # off a terminal
    with threads_beside_workers(device, cfg.loader_workers):
        for inputs in _decoded_tasks(cfg, manifest, tasks, img_size):
            result = compute_task(model, inputs, cfg.topk, cfg.last_layers, cfg.batch_size, device)
            store.write_task(inputs.task, **result)
            images += len(inputs.pixels)
            bar.update(1)
            lines.update(1, len(inputs.pixels))
            bar.set_postfix(img_s=f"{images / (time.perf_counter() - t0):.0f}")
    bar.close()
    return images


def cache_targets(cfg: CacheConfig, progress: bool = False) -> dict[str, Any]:
    """Create or resume the store at cfg.out and compute every pending task. Returns a short summary."""
    validate_config(cfg)
    manifest = load_manifest(cfg.shards)
    model, ckpt = load_encoder(cfg.base_model, cfg.base_arch)
    rows = manifest.total_rows if cfg.limit is None else min(cfg.limit, manifest.total_rows)
    arch = ckpt.arch
    require(cfg.topk <= arch.num_patches, f"--topk {cfg.topk} exceeds the {arch.num_patches} patches of {arch.name}")
    require(cfg.last_layers <= arch.depth, f"--last-layers {cfg.last_layers} exceeds the depth {arch.depth}")
    spec = StoreSpec(views=cfg.views, rows=rows, patches=arch.num_patches, dim=arch.embed_dim,
                     heads=arch.num_heads, k=cfg.topk, chunk_rows=cfg.chunk_rows, codec=cfg.codec)
    store = TargetStore.create_or_resume(cfg.out, spec, store_attributes(cfg, manifest, ckpt, rows))
    pending = store.pending_tasks()
    total = len(store.tasks())
    require_free_space(cfg.out, pending_bytes(store, pending), f"the {len(pending)} pending tasks",
                       "finished tasks are kept")
    log.info("store %s: %d views x %d rows, %d of %d tasks pending; base model %s (%s, sha256 %s)", cfg.out,
             cfg.views, rows, len(pending), total, arch.name, ckpt.fmt, ckpt.sha256[:12])
    t0 = time.perf_counter()
    if not pending:
        images = 0
    elif cfg.workers or cfg.scheduler:
        from tec_pipeline.store.distributed import run_on_dask

        images = run_on_dask(cfg, pending, progress)
    else:
        images = run_in_process(cfg, store, model, manifest, pending, progress)
    seconds = time.perf_counter() - t0
    return {"store": cfg.out, "tasks_run": len(pending), "tasks_total": total, "images": images,
            "seconds": seconds, "img_s": images / seconds if seconds > 0 else 0.0,
            "config": to_plain(dataclasses.asdict(cfg))}
