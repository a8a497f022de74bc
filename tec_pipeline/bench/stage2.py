"""Stage 2, cached vs online: `tec pretrain` itself (`run_pretrain`), timed step by step.

Each run is a real `run_pretrain` (same loader, same `_Step`, same optimiser step) in a fresh run directory,
with a metrics row per step (--log-every 1) so metrics.csv gives every step's wall time, loader wait included.
The first epoch is a warm-up. Two figures per run, over the following `preset.epochs` epochs:
- steady state: every step but each epoch's first.
- whole epochs: all steps.
The loader's workers live for the whole run and stream epoch after epoch, so an epoch's first steps should
wait no longer than the rest: `epoch_start_wait` is the loader-wait fraction of each timed epoch's first
min(20, steps/2) steps, beside that of its other steps.
The base model's share f of an online step is measured inside the step: `stored_targets`, which `_Step` calls
for the targets, is wrapped by a clock (synchronised on CUDA) for the duration of the run.
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import torch

from tec_pipeline.bench.data import BenchData
from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.bench.timing import interleaved, synchronize
from tec_pipeline.data.loader import steps_per_epoch
from tec_pipeline.store.integrity import describe
from tec_pipeline.store.target_store import TargetStore
from tec_pipeline.train import pretrain


@dataclass(frozen=True)
class RunFigures:
    """Throughput figures of a set of steps of one pretraining run."""

    img_s: float  # loaded images (views) per second
    teacher_share: float  # fraction of the step time spent computing targets (0 in cached mode)
    data_wait: float  # fraction of the step time spent waiting for the loader


@dataclass(frozen=True)
class RunResult:
    steady: RunFigures  # each epoch's first step left out
    epoch: RunFigures  # whole epochs
    start_wait: float = 0.0  # loader-wait fraction of each timed epoch's first `start_steps` steps
    rest_wait: float = 0.0  # ... and of its other steps
    start_steps: int = 0


@contextlib.contextmanager
def teacher_clock(device: str) -> Iterator[list[float]]:
    """Seconds of every `stored_targets` call made by `pretrain._Step` while the context is open."""
    seconds: list[float] = []
    original = pretrain.stored_targets

    def clocked(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        synchronize(device)  # work queued before the call belongs to the step, not the base model
        start = time.perf_counter()
        out = original(*args, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        return out

    pretrain.stored_targets = clocked
    try:
        yield seconds
    finally:
        pretrain.stored_targets = original


def _figures(step_s: list[float], wait: list[float], teacher_s: list[float], batch: int) -> RunFigures:
    total = sum(step_s)
    return RunFigures(batch * len(step_s) / total, sum(teacher_s) / total,
                      sum(w * s for w, s in zip(wait, step_s, strict=True)) / total)


def run_figures(metrics_csv: Path, teacher_s: list[float], per_epoch: int, batch: int) -> RunResult:
    """Figures of the epochs after the first, from metrics.csv (one row per step, accum 1) and the per-step
    teacher seconds (empty in cached mode)."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) <= per_epoch:
        raise RuntimeError(f"{metrics_csv}: no steps after the {per_epoch}-step warm-up epoch")
    step_s = [batch / float(r["img_per_s"]) for r in rows]
    wait = [float(r["data_wait"]) for r in rows]
    teacher = teacher_s or [0.0] * len(rows)
    timed = range(per_epoch, len(rows))
    steady = [i for i in timed if i % per_epoch]

    def pick(values: list[float], indices: Iterable[int]) -> list[float]:
        return [values[i] for i in indices]

    first = min(20, per_epoch // 2)
    start = [i for i in timed if i % per_epoch < first]
    rest = [i for i in timed if i % per_epoch >= first]
    return RunResult(_figures(pick(step_s, steady), pick(wait, steady), pick(teacher, steady), batch),
                     _figures(pick(step_s, timed), pick(wait, timed), pick(teacher, timed), batch),
                     _wait_share(pick(step_s, start), pick(wait, start)),
                     _wait_share(pick(step_s, rest), pick(wait, rest)), first)


def _wait_share(step_s: list[float], wait: list[float]) -> float:
    """Seconds waited for the loader over seconds of the steps."""
    return sum(w * s for w, s in zip(wait, step_s, strict=True)) / max(sum(step_s), 1e-12)


def pretrain_run(data: BenchData, preset: BenchPreset, device: str, out: Path, store: Path | None = None,
                 masks_per_view: int = 1) -> RunResult:
    """One `tec pretrain` run, cached (`store`) or online (base model in the step): 1 + preset.epochs epochs."""
    per_epoch = steps_per_epoch(data.shards, preset.batch, 1, preset.loader_workers)
    cfg = pretrain.PretrainConfig(
        shards=str(data.shards), out=str(out), targets=None if store is None else str(store),
        base_model=str(data.base_model) if store is None else None, epochs=1 + preset.epochs, batch_size=preset.batch,
        warmup_epochs=0.0, topk=preset.topk, last_layers=preset.last_layers, masks_per_view=masks_per_view,
        workers=preset.loader_workers, resume=False, device=device, log_every=1)
    try:
        with teacher_clock(device) as teacher_s:
            pretrain.run_pretrain(cfg)
        return run_figures(out / "metrics.csv", teacher_s, per_epoch, preset.batch)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def target_bytes_per_view(store: Path) -> float:
    """Stored (compressed) bytes the loader reads per image-view: every per-row array of the store."""
    arrays = describe(TargetStore.open(str(store)))["arrays"]
    return float(sum(a["stored_bytes_per_image_view"] for name, a in arrays.items() if name != "done"))


def summarise(cached: list[RunFigures], online: list[RunFigures]) -> dict[str, Any]:
    """Medians over repetitions; ratio is the median of the per-repetition cached/online ratios (each pair run
    back to back), ideal_ratio = 1 / (1 - teacher_share), efficiency = ratio / ideal_ratio."""
    share = median([r.teacher_share for r in online])
    ratio = median([c.img_s / o.img_s for c, o in zip(cached, online, strict=True)])
    ideal = 1.0 / (1.0 - share)
    return {"cached_img_s": median([r.img_s for r in cached]), "online_img_s": median([r.img_s for r in online]),
            "ratio": ratio, "teacher_share": share, "ideal_ratio": ideal, "efficiency": ratio / ideal,
            "cached_data_wait": median([r.data_wait for r in cached]),
            "online_data_wait": median([r.data_wait for r in online]),
            "cached_img_s_runs": [r.img_s for r in cached], "online_img_s_runs": [r.img_s for r in online]}


def _start_wait(runs: list[RunResult]) -> dict[str, float]:
    """Medians over repetitions of the wait fractions of each epoch's first steps and of the rest."""
    return {"first_steps": runs[0].start_steps, "first_steps_wait": median([r.start_wait for r in runs]),
            "other_steps_wait": median([r.rest_wait for r in runs])}


def compare_stage2(data: BenchData, preset: BenchPreset, device: str, store: Path, work: Path) -> dict[str, Any]:
    """Cached vs online step throughput and M masks per view, all interleaved, preset.reps times.

    Returns {'stage2': steady-state figures + 'whole_epoch': the same over whole epochs, 'multimask': {M: ...}}.
    """
    runs = {"online": lambda: pretrain_run(data, preset, device, work / "online")}
    for m in preset.masks:
        runs[f"cached{m}"] = lambda m=m: pretrain_run(data, preset, device, work / f"cached{m}", store, m)
    results = interleaved(runs, preset.reps)
    cached, online = results["cached1"], results["online"]
    stage2 = {**summarise([r.steady for r in cached], [r.steady for r in online]),
              "whole_epoch": summarise([r.epoch for r in cached], [r.epoch for r in online]),
              "batch": preset.batch, "loader_workers": preset.loader_workers, "epochs_timed": preset.epochs,
              "reps": preset.reps, "epoch_start_wait": _start_wait(cached)}
    per_view = target_bytes_per_view(store)
    multimask = {}
    for m in preset.masks:
        steady = median([r.steady.img_s for r in results[f"cached{m}"]])
        multimask[str(m)] = {"img_s": steady, "student_samples_s": m * steady, "target_bytes_per_sample": per_view / m,
                             "whole_epoch_img_s": median([r.epoch.img_s for r in results[f"cached{m}"]])}
    return {"stage2": stage2, "multimask": multimask}
