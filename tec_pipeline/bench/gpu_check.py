"""`make gpu-check`: one unattended run (≤ 8 min on one GPU) of the stage-1 and stage-2 figures at preset base.

Measures, into one JSON file: the bare base-model forward (img/s), end-to-end `cache_targets` (img/s) and their
ratio; bf16-vs-fp32 target agreement (feature max abs / relative error, top-k overlap); whether the int8/ecq
encoders on the device give the host's arrays bit for bit; cached vs online stage-2 step throughput. `--device cpu --smoke` runs the same code at the tiny quick preset (a test does).

    python -m tec_pipeline.bench.gpu_check --out runs/gpu-check.json [--device cuda] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tec_pipeline.bench.data import prepare_data
from tec_pipeline.bench.presets import BenchPreset, get_preset
from tec_pipeline.bench.report import host_info, write_json
from tec_pipeline.bench.stage1 import bare_forward, end_to_end, preload_views
from tec_pipeline.bench.stage2 import compare_stage2
from tec_pipeline.devices import resolve_device
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.stage1.quantize import device_encode, encodes_on_device
from tec_pipeline.store.codecs import get_codec

log = logging.getLogger(__name__)
AGREEMENT_VIEWS = 64


def check_preset(smoke: bool) -> BenchPreset:
    """Preset base cut to the budget (one repetition, one mask count, a 2x large store), or tiny-quick."""
    if smoke:
        return dataclasses.replace(get_preset("tiny", quick=True), masks=(1,))
    return dataclasses.replace(get_preset("base"), reps=1, epochs=1, masks=(1,), memory_factor=2)


def precision_agreement(model: torch.nn.Module, views: torch.Tensor, preset: BenchPreset,
                        device: torch.device) -> dict[str, float]:
    """bf16 autocast vs fp32 stage-1 targets on the same views [n,3,S,S]: feature errors, top-k overlap."""
    with torch.no_grad():
        exact = stored_targets(model, views, preset.topk, preset.last_layers)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = stored_targets(model, views, preset.topk, preset.last_layers)
    diff = (low["features"] - exact["features"]).abs()
    a, b = exact["topk_index"].cpu(), low["topk_index"].cpu()
    overlap = [len(set(x.tolist()) & set(y.tolist())) / preset.topk for x, y in zip(a, b, strict=True)]
    return {"views": len(views), "feature_max_abs_err": float(diff.max()),
            "feature_max_rel_err": float(diff.max() / exact["features"].abs().max()),
            "attention_max_abs_err": float((low["attention"] - exact["attention"]).abs().max()),
            "topk_overlap_mean": sum(overlap) / len(overlap), "topk_overlap_min": min(overlap),
            "topk_identical_fraction": float((a == b).all(dim=1).float().mean())}


def device_codecs_exact(device: torch.device, rows: int = 64) -> dict[str, bool]:
    """Per quantised codec part: do stage 1's device encoders on `device` give the numpy encoders' arrays?
    (Tested bit for bit on CPU; on a GPU it rests on IEEE division and rounding, which this checks.)"""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("int8", "ecq"):
        codec = get_codec(name)
        for part, shape in ((codec.features, (rows, 196, 768)), (codec.attention, (rows, 16, 12, 196))):
            if not encodes_on_device(part):
                continue
            x = torch.randn(shape, generator=g) * 3
            want = part.encode(x.numpy())
            got = device_encode(part, x.to(device))[0]
            out[f"{name}_{part.name}"] = all(np.array_equal(got[k].cpu().numpy(), v) for k, v in want.items())
    return out


def gpu_check(device: torch.device, smoke: bool, work: Path) -> dict[str, Any]:
    preset = check_preset(smoke)
    out: dict[str, Any] = {"preset": preset.name, "device": str(device), "torch": torch.__version__,
                           "host": host_info(device), "ran_on_gpu": device.type == "cuda", "seconds": {}}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        out["seconds"][name], clock = time.perf_counter() - clock, time.perf_counter()
        log.info("gpu-check: %s in %.0f s", name, out["seconds"][name])

    data = prepare_data(preset, work / "data")
    lap("data")
    model, ckpt = load_encoder(str(data.base_model))
    model.to(device)
    views = preload_views(data, preset, device, ckpt.arch.img_size)
    bare = [bare_forward(model, views, preset, device) for _ in range(2)][-1]  # the first warms up
    e2e = end_to_end(data, preset, device, work / "stage1.zarr")
    out["stage1"] = {"bare_forward_img_s": bare, "end_to_end_img_s": e2e, "ratio": e2e / bare,
                     "images": len(views), "batch": preset.batch, "loader_workers": preset.loader_workers}
    lap("stage1")
    out["agreement_bf16_vs_fp32"] = precision_agreement(model, views[:AGREEMENT_VIEWS], preset, device)
    out["device_codecs_bit_exact"] = device_codecs_exact(device)
    lap("agreement")
    stage2 = compare_stage2(data, preset, device.type, work / "stage1.zarr", work)["stage2"]
    out["stage2"] = {k: stage2[k] for k in ("cached_img_s", "online_img_s", "ratio", "teacher_share",
                                            "ideal_ratio", "efficiency")}
    lap("stage2")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny quick preset (CPU test of the script)")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="tec-gpu-check-", dir=args.work_dir) as tmp:
        result = gpu_check(device, args.smoke, Path(tmp))
    log.info("%s", json.dumps(result, indent=1))
    write_json(result, args.out)


if __name__ == "__main__":
    main()
