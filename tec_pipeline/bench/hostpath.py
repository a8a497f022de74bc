"""Stage 1's host-path cost: the whole `cache_targets` pipeline with a zero-cost stand-in base model.

The stand-in returns ViT-B/16-shaped targets (L=196, D=768, H=12, k=15; Gaussian values, the documented worst
case for the quantising codecs) without computing, so what is measured is everything around the model: read,
JPEG decode, view sampling and replay, the copies to and from the device, casts, encoding, compression, CRC and
writes. Images are ImageNet-sized JPEGs (500x375 or 375x500, quality 90) cut from scikit-image's photos (`bench.data.write_photo_shards`).

Reported per codec as CPU milliseconds per view (process CPU time of this process, its writer threads and
the decode workers it reaps: a busy host does not move it much) and views per second (wall clock: it does).
On a CPU "device" the CPU also does what a GPU does in stage 1 (normalise the uint8 pixels, the stand-in's
targets, casts and copies back to host memory): the run reports that compute step's CPU time on its thread
(`compute_cpu_s`), which is subtracted: `host_ms_per_view` is what the host pays beside a GPU, the figure the
goals are judged on. On CUDA nothing is subtracted (kernel launches are host work).

The codecs run with the `torch` replay, the one for GPU-scale stage 1; fp16 is measured with `pil` too.
"""

from __future__ import annotations

import hashlib
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tec_pipeline.bench.data import write_photo_shards
from tec_pipeline.models.base import EncoderCheckpoint
from tec_pipeline.models.vit import resolve_arch
from tec_pipeline.stage1 import CacheConfig, cache_targets

STAND_IN_ARCH = "vit_base_patch16_224"
HOST_PATH_CODECS = ("fp16", "int8", "ecq")
HOST_PATH_REPLAY = "torch"
GOALS_CPU_MS = {"fp16": 1.6, "ecq": 1.1}


class StandInBase(torch.nn.Module):
    """A base model that costs nothing: `stored_targets` slices pre-made targets of the ViT-B shapes.

    features [B,196,768] and attention [B,16,12,196] float32 N(0,1), topk_index [B,15]; a different slice of
    a pool twice the batch each call, so consecutive rows are not byte-identical (that would flatter zstd).
    """

    def __init__(self, batch: int, k: int = 15, seed: int = 0) -> None:
        super().__init__()
        arch = resolve_arch(STAND_IN_ARCH)
        g = torch.Generator().manual_seed(seed)
        L, D, H = arch.num_patches, arch.embed_dim, arch.num_heads
        self.register_buffer("features", torch.randn(2 * batch, L, D, generator=g))
        self.register_buffer("attention", torch.randn(2 * batch, 1 + k, H, L, generator=g) * 3)
        self.register_buffer("topk", torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(2 * batch)]))
        self.batch, self._calls = batch, 0

    def stored_targets(self, x: torch.Tensor, k: int, last_layers: int) -> dict[str, torch.Tensor]:
        b, start = len(x), (self._calls * 7) % (self.batch + 1)
        self._calls += 1
        return {"features": self.features[start:start + b], "attention": self.attention[start:start + b, : 1 + k],
                "topk_index": self.topk[start:start + b, :k]}


def stand_in_checkpoint() -> EncoderCheckpoint:
    arch = resolve_arch(STAND_IN_ARCH)
    return EncoderCheckpoint({}, arch, "stand-in", hashlib.sha256(b"stand-in ViT-B/16").hexdigest(), "stand-in")


def _cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its reaped children (the decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def host_path_cost(shards: Path, work: Path, codec: str, device: torch.device, views: int = 2,
                   batch: int = 64, chunk_rows: int = 256, loader_workers: int = 1,
                   writer_threads: int = 2, replay: str = HOST_PATH_REPLAY) -> dict[str, Any]:
    """One whole stage-1 run over `shards` with the stand-in, into a fresh store: CPU-ms per view (all of it, the
    device side of it, and the host's), views/s."""
    out = work / f"host-{codec}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    model = StandInBase(batch).to(device)
    cfg = CacheConfig(shards=str(shards), base_model="stand-in", out=str(out), views=views, topk=15, codec=codec,
                      chunk_rows=chunk_rows, batch_size=batch, loader_workers=loader_workers,
                      writer_threads=writer_threads, device=str(device), replay=replay,
                      quantize_on="device")  # as beside a GPU: the device quantises, the host compresses and writes
    cpu, wall = _cpu_seconds(), time.perf_counter()
    summary = cache_targets(cfg, encoder=(model, stand_in_checkpoint()))
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".claims"), ignore_errors=True)
    total = 1e3 * cpu / summary["images"]
    # the run's own compute-step CPU (this thread, one intra-op thread beside the decode worker): on CUDA the
    # GPU's work, and what the CPU spends there (launches) is host work
    device_ms = 1e3 * summary["compute_cpu_s"] / summary["images"] if device.type == "cpu" else 0.0
    return {"cpu_ms_per_view": total, "device_ms_per_view": device_ms, "host_ms_per_view": total - device_ms,
            "views_s": summary["images"] / wall, "views": summary["images"], "replay": replay}


def compare_host_path(root: Path, device: torch.device, images: int, loader_workers: int = 1) -> dict[str, Any]:
    """Host-path cost per codec on `images` ImageNet-sized JPEGs at V=2 (torch replay; fp16 also with PIL's),
    after one unmeasured warm-up run, with the goals beside them."""
    shards = root / "host-path" / "shards"
    write_photo_shards(shards, images)
    out: dict[str, Any] = {"images": images, "views": 2, "loader_workers": loader_workers, "replay": HOST_PATH_REPLAY,
                           "codecs": {}}
    # a first run pays one-off costs (lazy imports, Zarr's codec pipeline, the first decode worker): not per view
    host_path_cost(shards, root, "fp16", device, loader_workers=loader_workers)
    for codec in HOST_PATH_CODECS:
        out["codecs"][codec] = host_path_cost(shards, root, codec, device, loader_workers=loader_workers)
    out["pil_replay_fp16"] = host_path_cost(shards, root, "fp16", device, loader_workers=loader_workers, replay="pil")
    out["goals_cpu_ms_per_view"] = dict(GOALS_CPU_MS)
    return out
