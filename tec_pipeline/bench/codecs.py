"""Bytes per stored view for every store codec, on real stage-1 targets of the preset's base model.

Targets are computed in float32 as stage 1 computes them (features normalised), for view 0 of the first
`max_rows` rows, then `store.codecs.measure_codec` encodes, writes, reads and decodes them through a Zarr
memory store; each figure is the median over repetitions of single runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tec_pipeline.bench.data import BenchData
from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.bench.timing import median_of
from tec_pipeline.data.shards import load_manifest
from tec_pipeline.models.base import load_encoder
from tec_pipeline.stage1.compute import compute_task
from tec_pipeline.stage1.decode import decode_task
from tec_pipeline.store.codecs import CODECS, measure_codec
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
