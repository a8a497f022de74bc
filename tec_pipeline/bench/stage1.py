"""Stage 1: `tec cache-targets` end to end vs a bare base-model forward on preloaded tensors, and where time goes.

End to end = the whole `cache_targets` call into a fresh store (model load, store creation, read, decode,
replay, base model, encode, write), images = views × rows over its wall time. Bare = `compute_targets` on
the same views, already decoded, normalised and on the device, at the same batch size and autocast as stage 1.
The breakdown runs the same stage-1 functions one after another (no overlap) and times each part.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from tec_pipeline.bench.data import BenchData
from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.bench.timing import interleaved, timed
from tec_pipeline.data.shards import iter_samples, load_manifest
from tec_pipeline.data.views import normalize
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.targets import compute_targets
from tec_pipeline.stage1 import cache_targets
from tec_pipeline.stage1.compute import compute_task
from tec_pipeline.stage1.config import autocast, resolve_amp
from tec_pipeline.stage1.decode import decode_task
from tec_pipeline.stage1.plan import store_attributes
from tec_pipeline.store.layout import StoreSpec, Task
from tec_pipeline.store.target_store import TargetStore


def stage1_autocast(device: torch.device) -> Any:
    """Stage 1's default autocast: bf16 on CUDA, none on CPU."""
    return autocast(resolve_amp("auto", device.type), device)


def preload_views(data: BenchData, preset: BenchPreset, device: torch.device, img_size: int) -> torch.Tensor:
    """Every stored view (view-major) decoded, replayed and normalised: float32 [V·N, 3, S, S] on `device`."""
    manifest = load_manifest(data.shards)
    views = [decode_task(str(data.shards), manifest, Task(v, 0, 0, data.rows), 0, img_size).pixels
             for v in range(preset.views)]
    return normalize(torch.cat(views)).to(device)


def bare_forward(model: torch.nn.Module, views: torch.Tensor, preset: BenchPreset, device: torch.device) -> float:
    """Images/s of `compute_targets` over preloaded `views` in stage-1 batches."""

    def run() -> None:
        with stage1_autocast(device):
            for start in range(0, len(views), preset.batch):
                compute_targets(model, views[start:start + preset.batch], preset.topk, preset.last_layers)

    return len(views) / timed(run, device)[1]


def end_to_end(data: BenchData, preset: BenchPreset, device: torch.device, out: Path, large: bool = False) -> float:
    """Images/s of one whole `cache_targets` call into a fresh store at `out`."""
    shutil.rmtree(out, ignore_errors=True)
    summary, seconds = timed(lambda: cache_targets(data.cache_config(preset, out, device.type, large)), device)
    return summary["images"] / seconds


class _Laps:
    """Accumulated seconds per named part: each lap() charges the time since the previous lap to `name`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def stage1_parts(data: BenchData, preset: BenchPreset, device: torch.device, out: Path) -> dict[str, Any]:
    """Seconds of each stage-1 part, run one after another over every task of a fresh store.

    read_decode: tar read + image decode; replay: view sampling, crop, resize; base_model: normalise, targets,
    copies to host; encode: the codec; write: Zarr chunk writes (compression, CRC, files). The fixed costs
    (model load, store creation) are reported apart, in seconds. Decoding is timed alone and then again inside
    `decode_task`, whose remainder is the replay.
    """
    shutil.rmtree(out, ignore_errors=True)
    cfg = data.cache_config(preset, out, device.type)
    laps = _Laps()
    model, ckpt = load_encoder(cfg.base_model)
    model.to(device)
    laps.lap("load_model")
    manifest = load_manifest(cfg.shards)
    spec = StoreSpec(views=cfg.views, rows=data.rows, patches=ckpt.arch.num_patches, dim=ckpt.arch.embed_dim,
                     heads=ckpt.arch.num_heads, k=cfg.topk, chunk_rows=cfg.chunk_rows, codec=cfg.codec)
    amp = resolve_amp(cfg.amp, device.type)
    attrs = store_attributes(cfg, manifest, ckpt, data.rows, {"autocast": amp, "device_type": device.type})
    store = TargetStore.create_or_resume(out, spec, attrs)
    laps.lap("create_store")
    for task in store.tasks():
        for _ in iter_samples(cfg.shards, task.row_start, task.row_stop, manifest):
            pass
        laps.lap("read_decode")
        inputs = decode_task(cfg.shards, manifest, task, cfg.seed, ckpt.arch.img_size)
        laps.lap("decode_task")
        result = compute_task(model, inputs, cfg.topk, cfg.last_layers, cfg.batch_size, device, amp, store.codec)
        laps.lap("base_model")
        store.codec.features.encode(result["features"])
        store.codec.attention.encode(result["attention"])
        laps.lap("encode")
        store.write_task(task, **result)
        laps.lap("write")
    s = laps.seconds
    s["replay"] = s.pop("decode_task") - s["read_decode"]
    s["write"] -= s["encode"]  # write_task encodes before it writes
    fixed = {k: s.pop(k) for k in ("load_model", "create_store")}
    images = spec.views * spec.rows
    return {"ms_per_image": {k: 1e3 * v / images for k, v in s.items()}, "fixed_s": fixed,
            "serial_img_s": images / (sum(s.values()) + sum(fixed.values()))}


def _paired_runs(data: BenchData, preset: BenchPreset, device: torch.device, work: Path) -> dict[str, list[float]]:
    """Images/s of preset.reps end-to-end runs (stores work/stage1-<i>.zarr) interleaved with bare forwards,
    then of one end-to-end run over the large shards (work/large.zarr) beside one more bare forward."""
    model, ckpt = load_encoder(str(data.base_model))
    model.to(device)
    views = preload_views(data, preset, device, ckpt.arch.img_size)
    stores = iter([work / f"stage1-{i}.zarr" for i in range(preset.reps)])
    results = interleaved({"end_to_end": lambda: end_to_end(data, preset, device, next(stores)),
                           "bare": lambda: bare_forward(model, views, preset, device)}, preset.reps)
    results.update(interleaved({"large": lambda: end_to_end(data, preset, device, work / "large.zarr", large=True),
                                "large_bare": lambda: bare_forward(model, views, preset, device)}, 1))
    return results


def compare_stage1(data: BenchData, preset: BenchPreset, device: torch.device,
                   work: Path) -> tuple[dict[str, Any], Path, Path]:
    """End-to-end vs bare-forward images/s (interleaved, medians), the same at memory_factor times the images
    (one run: fixed and pipeline start-up costs amortised), and the serial breakdown of the parts.

    Returns the figures and the finished fp16 stores of the small and the large shards (for stage 2).
    """
    runs = _paired_runs(data, preset, device, work)
    for i in range(preset.reps - 1):
        shutil.rmtree(work / f"stage1-{i}.zarr", ignore_errors=True)
    e2e, bare = runs["end_to_end"], runs["bare"]
    parts = stage1_parts(data, preset, device, work / "parts.zarr")
    shutil.rmtree(work / "parts.zarr", ignore_errors=True)
    part_ms = parts["ms_per_image"]
    figures = {"end_to_end_img_s": median(e2e), "bare_forward_img_s": median(bare),
               "ratio": median([a / b for a, b in zip(e2e, bare, strict=True)]), "images": preset.views * data.rows,
               "end_to_end_img_s_large": runs["large"][0], "ratio_large": runs["large"][0] / runs["large_bare"][0],
               "images_large": preset.views * data.rows * preset.memory_factor,
               "parts_ms_per_image": part_ms, "fixed_s": parts["fixed_s"], "serial_img_s": parts["serial_img_s"],
               "slowest_part_besides_model": max((k for k in part_ms if k != "base_model"), key=part_ms.__getitem__),
               "end_to_end_img_s_runs": e2e, "bare_forward_img_s_runs": bare,
               "loader_workers": preset.loader_workers, "batch": preset.batch, "reps": preset.reps}
    return figures, work / f"stage1-{preset.reps - 1}.zarr", work / "large.zarr"
