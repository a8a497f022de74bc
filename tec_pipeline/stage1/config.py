"""Stage-1 configuration: the frozen `CacheConfig`, its checks, and the precision it resolves to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tec_pipeline.config import require
from tec_pipeline.data.views import DEFAULT_REPLAY, REPLAYS
from tec_pipeline.store.codecs import get_codec

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


@dataclass(frozen=True)
class CacheConfig:
    shards: str
    base_model: str
    out: str
    base_arch: str | None = None
    input_size: int | None = None  # the base model's input size (pos_embed resampled); None: its own
    views: int = 2
    topk: int = 15
    last_layers: int = 2
    codec: str = "ecq"  # chosen by `make study`: the smallest store within 0.3 linear-probe points of fp32 (README)
    chunk_rows: int = 256
    batch_size: int = 64
    seed: int = 0
    limit: int | None = None
    workers: int = 0
    scheduler: str | None = None
    loader_workers: int = 1
    device: str = "auto"
    amp: str = "auto"
    writer_threads: int = 2
    replay: str = DEFAULT_REPLAY  # how a view's pixels are made from its box (data/views.py); recorded
    quantize_on: str = "auto"  # where int8/ecq targets are quantised (`quantizes_on_device`); the same bytes


QUANTIZE_CHOICES = ("auto", "device", "host")


def quantizes_on_device(cfg: CacheConfig, device: torch.device) -> bool:
    """Where the quantising codecs encode: `auto` on an accelerator's device (a quarter of the bytes cross back),
    on a CPU in the writer threads, which then run it beside the model (on 2 cores, ecq stage 1 ran at 192-219
    views/s encoding in the writers vs 159-185 encoding in the compute thread). Both give the same bytes."""
    return cfg.quantize_on == "device" or (cfg.quantize_on == "auto" and device.type != "cpu")


def validate_config(cfg: CacheConfig) -> None:
    """UserError (one line) for any setting outside its range; nothing is read or written yet."""
    require(cfg.views >= 1, f"--views must be >= 1, got {cfg.views}")
    # 0 must not quietly mean "whatever k a store holds": k is part of the store's identity
    require(cfg.topk >= 1, f"--topk must be >= 1 (the patch-query attention rows kept), got {cfg.topk}")
    require(cfg.last_layers >= 1, f"--last-layers must be >= 1, got {cfg.last_layers}")
    require(cfg.chunk_rows >= 1, f"--chunk-rows must be >= 1, got {cfg.chunk_rows}")
    require(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    require(cfg.limit is None or cfg.limit >= 1, f"--limit must be >= 1, got {cfg.limit}")
    require(cfg.workers >= 0 and cfg.loader_workers >= 0, "--workers must be >= 0")
    require(cfg.writer_threads >= 1, f"--writer-threads must be >= 1, got {cfg.writer_threads}")
    require(cfg.amp in AMP_CHOICES, f"--amp must be one of {', '.join(AMP_CHOICES)}, got {cfg.amp!r}")
    require(cfg.replay in REPLAYS, f"--replay must be one of {', '.join(REPLAYS)}, got {cfg.replay!r}")
    require(cfg.quantize_on in QUANTIZE_CHOICES,
            f"--quantize-on must be one of {', '.join(QUANTIZE_CHOICES)}, got {cfg.quantize_on!r}")
    get_codec(cfg.codec)


def resolve_amp(amp: str, device_type: str) -> str:
    """The autocast actually used: 'auto' is bf16 on CUDA and none on CPU; bf16/fp16 need a CUDA device.

    CPU autocast is refused rather than honoured: it is slower than fp32 on most CPUs and would make a store
    whose targets differ from every CPU-made one for no gain.
    """
    if amp == "auto":
        return "bf16" if device_type == "cuda" else "none"
    require(amp == "none" or device_type == "cuda",
            f"--amp {amp} needs a CUDA device, and this run computes on {device_type}; use --amp none")
    return amp


def autocast(amp: str, device: torch.device) -> torch.autocast:
    """The autocast context of a resolved `amp` ('bf16', 'fp16' or 'none') on `device`."""
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
