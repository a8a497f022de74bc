"""Bytes per stored view for every store codec, on real stage-1 targets of the preset's base model.

Targets are computed in float32 as stage 1 computes them (features normalised), for view 0 of the first
`max_rows` rows, then `measure_codec` encodes, writes, reads and decodes them through a Zarr memory store (with
the store's own array layouts); each figure is the median over repetitions of single runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zarr

from tec_pipeline.bench.data import BenchData
from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.bench.timing import median_of
from tec_pipeline.data.shards import load_manifest
from tec_pipeline.models.base import load_encoder
from tec_pipeline.stage1.compute import compute_task
from tec_pipeline.stage1.decode import decode_task
from tec_pipeline.store.codecs import CODECS, Codec, create_array, get_codec
from tec_pipeline.store.layout import Task

MAX_ROWS = 128  # one view of ViT-B: 128 rows are ~80 MB of float32 targets


def stage1_targets(data: BenchData, preset: BenchPreset, device: torch.device,
                   max_rows: int = MAX_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [n, L, D] normalised, attention float32 [n, 1+k, H, L]) of view 0, n ≤ max_rows."""
    model, ckpt = load_encoder(str(data.base_model))
    model.to(device)
    n = min(max_rows, data.rows)
    inputs = decode_task(str(data.shards), load_manifest(data.shards), Task(0, 0, 0, n), 0, ckpt.arch.img_size)
    result = compute_task(model, inputs, preset.topk, preset.last_layers, preset.batch, device)
    return result["features"], result["attention"]


def _round_trip(
    codec: Codec, arrays: Mapping[str, zarr.Array], features: np.ndarray, attention: np.ndarray
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Encode + write view 0, then read + decode it: (encode s, decode s, features, attention)."""
    t0 = time.perf_counter()
    encoded = {**codec.features.encode(features), **codec.attention.encode(attention)}
    for key, value in encoded.items():
        arrays[key][0] = value
    t1 = time.perf_counter()
    stored = {key: arr[0] for key, arr in arrays.items()}
    feats, att = codec.features.decode(stored), codec.attention.decode(stored)
    return t1 - t0, time.perf_counter() - t1, feats, att


def measure_codec(name: str, features: np.ndarray, attention: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Encode + write to a Zarr MemoryStore, read + decode, and measure (best time of `repeats`).

    features: float32 [n, L, D] (normalised); attention: float32 [n, 1+k, H, L] — one view of n images.
    bytes_per_view is the size of the chunk objects actually written (compressed, CRC included, metadata
    excluded) divided by n; ratio_to_fp16 divides it by the raw float16 size of both tensors. MB/s count the
    float32 input bytes (1 MB = 1e6 B) over encode+write and read+decode respectively.
    """
    codec = get_codec(name)
    n, patches, dim = features.shape
    queries, heads = attention.shape[1:3]
    objects: dict[str, zarr.core.buffer.Buffer] = {}
    group = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w")
    layouts = codec.layouts(patches, dim, queries, heads)
    arrays = {lay.name: create_array(group, lay, (1, n), n) for lay in layouts}
    runs = [_round_trip(codec, arrays, features, attention) for _ in range(max(1, repeats))]
    feats, att = runs[-1][2:]

    chunk_bytes = sum(len(buf) for key, buf in objects.items() if "/c/" in key)
    raw_fp16 = n * (patches * dim + queries * heads * patches) * 2
    input_mb = (features.nbytes + attention.nbytes) / 1e6
    return {
        "bytes_per_view": chunk_bytes / n,
        "ratio_to_fp16": chunk_bytes / raw_fp16,
        "encode_mb_s": input_mb / min(r[0] for r in runs),
        "decode_mb_s": input_mb / min(r[1] for r in runs),
        "max_abs_err": float(np.abs(feats - features).max()),
        "max_abs_err_attention": float(np.abs(att - attention).max()),
        "rmse": float(np.sqrt(np.mean((feats - features) ** 2))),
    }


def compare_codecs(data: BenchData, preset: BenchPreset, device: torch.device) -> dict[str, dict[str, Any]]:
    """{codec: measure_codec figures (medians)} for every codec in `store.codecs.CODECS`, fp16 included."""
    features, attention = stage1_targets(data, preset, device)
    out = {}
    for name in CODECS:
        runs = [measure_codec(name, features, attention, repeats=1) for _ in range(max(preset.reps, 3))]
        out[name] = {**median_of(runs), "rows": len(features)}
    return out


def best_codec(codecs: dict[str, dict[str, Any]]) -> str:
    """The codec with the smallest ratio to raw fp16."""
    return min(codecs, key=lambda name: codecs[name]["ratio_to_fp16"])
