"""Frozen-encoder evaluation (linear probe, kNN) of a checkpoint on labelled train/test shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tec_pipeline.config import require
from tec_pipeline.devices import resolve_device
from tec_pipeline.eval.features import check_input_size, shard_features
from tec_pipeline.eval.knn import knn_evaluate
from tec_pipeline.eval.linear import linear_probe
from tec_pipeline.eval.report import evaluation_record

METHODS = ("linprobe", "knn")


@dataclass(frozen=True)
class FrozenEvalConfig:
    """Options of `tec linprobe` / `tec knn`."""

    checkpoint: str
    train_shards: str
    test_shards: str
    json: str | None = None
    arch: str | None = None
    input_size: int | None = None  # run the encoder at this size (pos_embed resampled); None: its own
    batch_size: int = 256
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    k: int = 20
    temperature: float = 0.07
    protocol: str = "lbfgs"  # linear probe only: see eval/linear.py PROTOCOLS


def evaluate_frozen(methods: tuple[str, ...], cfg: FrozenEvalConfig, progress: bool = False
                    ) -> dict[str, dict[str, Any]]:
    """Load the encoder, extract centre-view features of both splits once, run each of `methods` on them;
    {method: JSON record}. One extraction serves both methods: it is most of an evaluation's cost.
    `progress`: tqdm bars over the feature extraction and the probe (the stage passes logs.progress_enabled())."""
    from tec_pipeline.models.base import load_encoder

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {METHODS}, got {methods!r}")
    require(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    require(cfg.k >= 1 and cfg.temperature > 0, f"--k must be >= 1 and --temperature > 0, got {cfg.k}, {cfg.temperature}")
    encoder, info = load_encoder(cfg.checkpoint, cfg.arch, arch_flag="--arch", input_size=cfg.input_size)
    check_input_size(cfg.arch, info.arch, cfg.checkpoint, cfg.input_size)
    device, size = resolve_device("auto"), info.arch.img_size
    train = shard_features(encoder, cfg.train_shards, size, cfg.batch_size, cfg.limit_train, device, progress)
    test = shard_features(encoder, cfg.test_shards, size, cfg.batch_size, cfg.limit_test, device, progress)
    records = {}
    for method in methods:
        if method == "knn":
            result = knn_evaluate(train, test, cfg.k, cfg.temperature, device, progress)
        else:
            result = linear_probe(train, test, cfg.seed, device, cfg.protocol, progress)
        records[method] = evaluation_record(method, info, len(train), len(test), cfg.seed, result)
    return records
