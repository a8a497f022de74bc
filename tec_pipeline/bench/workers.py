"""Peak memory of one stage-2 loader worker at ViT-B shapes, for a store and one `memory_factor` times larger.

Data: ImageNet-sized JPEGs (500×375 crops of scikit-image's photos) and a synthetic one-view fp16 store of
ViT-B/16 shape (L = 196, D = 768, H = 12, k = 15; 376 kB of targets per row), chunk rows as stage 1 writes
them by default. Each measurement is a fresh interpreter that streams one whole epoch through the library's
own loader (`EpochStream` → `iter_unit_batches` with `CachedViews`, in DataLoader workers, batches
normalised in the parent as in training) and reports, per worker, the resident set at its start and its
peak (VmHWM). A forked worker starts out mapping pages it shares with its parent; what it adds, peak −
start, is what each further worker costs a node, and is the figure the goal is judged on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import mean
from typing import Any

from tec_pipeline.bench.child import own_peak_rss_mb
from tec_pipeline.bench.data import VIT_B_TARGETS, write_photo_shards, write_synthetic_store
from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.bench.timing import interleaved
from tec_pipeline.data.loader import EpochStream, make_loader, normalized, plan_epoch
from tec_pipeline.data.shards import load_manifest
from tec_pipeline.stage2.cached import CachedViews
from tec_pipeline.store.target_store import TargetStore

COMMAND = "from tec_pipeline.bench.workers import main; main()"


def rss_mb() -> float:
    """This process's resident set now (VmRSS), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


class MeasuredStream(EpochStream):
    """The library's epoch stream; each worker also writes {start_mb, peak_mb} to `report_dir` when it ends."""

    def __init__(self, *args: Any, report_dir: str) -> None:
        super().__init__(*args)
        self.report_dir = report_dir

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = rss_mb()
        yield from super().__iter__()
        Path(self.report_dir, f"worker-{os.getpid()}.json").write_text(
            json.dumps({"start_mb": start, "peak_mb": own_peak_rss_mb()}))


def main() -> None:
    """argv: OUT SHARDS STORE BATCH WORKERS BUFFER. Streams one epoch, writes the figures to OUT as JSON."""
    out, shards, store, batch, workers, buffer = sys.argv[1:7]
    batch_size, n_workers, shuffle_buffer = int(batch), int(workers), int(buffer)
    item_fn = CachedViews(store, 0, VIT_B_TARGETS["img_size"])
    plans = plan_epoch(load_manifest(shards), 0, 0, batch_size, workers=n_workers, shuffle_buffer=shuffle_buffer,
                       valid=item_fn.known_valid())
    item_fn = CachedViews(store, 0, VIT_B_TARGETS["img_size"])  # unopened: the workers open their own
    with tempfile.TemporaryDirectory() as reports:
        parent_before = rss_mb()
        start, rows = time.perf_counter(), 0
        loader = make_loader(MeasuredStream(shards, plans, 0, item_fn, report_dir=reports), n_workers)
        for batch_ in normalized(iter(loader)):
            rows += len(batch_["rows"])
        seconds = time.perf_counter() - start
        found = [json.loads(p.read_text()) for p in sorted(Path(reports).glob("worker-*.json"))]
    Path(out).write_text(json.dumps({"workers": found, "parent_before_mb": parent_before,
                                     "parent_peak_mb": own_peak_rss_mb(), "rows": rows, "seconds": seconds}))


def measure(shards: Path, store: Path, batch: int, workers: int, buffer: int) -> dict[str, Any]:
    """One fresh-interpreter epoch (see `main`); RuntimeError with its last line of output if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "workers.json"
        args = [str(report), str(shards), str(store), str(batch), str(workers), str(buffer)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", COMMAND, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env, check=False)
        if proc.returncode != 0 or not report.is_file():
            lines = proc.stderr.strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"loader-worker measurement exited with {proc.returncode}: {lines[-1]}")
        return json.loads(report.read_text())


def predicted_mb(buffer: int, chunk_rows: int, batch: int, jpeg_bytes: float, target_bytes: float,
                 emitted_bytes: float, prefetch: int) -> float:
    """The README's formula for what one worker adds: buffer·(J + T) + C·T + prefetch·B·E (+ decode scratch)."""
    return (buffer * (jpeg_bytes + target_bytes) + chunk_rows * target_bytes + prefetch * batch * emitted_bytes) / 1e6


def _row_sizes(shards: Path, store: Path) -> tuple[float, float, float]:
    """(mean encoded image bytes J, stored target bytes per row T, bytes of one emitted row E)."""
    manifest = load_manifest(shards)
    jpeg = sum((shards / s.name).stat().st_size for s in manifest.shards) / manifest.total_rows
    spec = TargetStore.open(str(store)).spec
    t = VIT_B_TARGETS
    target = 2 * (spec.patches * spec.dim + (1 + spec.k) * spec.heads * spec.patches) + 2 * spec.k + 4 * 5 + 1
    emitted = 3 * t["img_size"] ** 2 + target - 2 * spec.k - 1 + 8 * spec.k + 8
    return jpeg, float(target), float(emitted)


def compare_worker_memory(preset: BenchPreset, work: Path) -> dict[str, Any]:
    """Per-worker peak memory at ViT-B shapes for `preset.worker_rows` rows and memory_factor times more."""
    from tec_pipeline.data.loader import PREFETCH_BATCHES

    sizes = {"small": preset.worker_rows, "large": preset.worker_rows * preset.memory_factor}
    data = {}
    for name, rows in sizes.items():
        shards = work / f"worker-shards-{name}"
        write_photo_shards(shards, rows)
        data[name] = (shards, write_synthetic_store(work / f"worker-store-{name}.zarr", shards,
                                                        preset.worker_chunk_rows))
    runs = interleaved({name: (lambda d=d: measure(*d, preset.batch, preset.worker_loaders, preset.worker_buffer))
                        for name, d in data.items()}, 1)
    result: dict[str, Any] = {"rows_small": sizes["small"], "rows_large": sizes["large"],
                              "workers": preset.worker_loaders, "shuffle_buffer": preset.worker_buffer,
                              "batch": preset.batch, "chunk_rows": preset.worker_chunk_rows}
    for name, (run,) in runs.items():
        own = [w["peak_mb"] - w["start_mb"] for w in run["workers"]]
        result[f"worker_peak_mb_{name}"] = max(w["peak_mb"] for w in run["workers"])
        result[f"worker_own_peak_mb_{name}"] = max(own)
        result[f"worker_start_mb_{name}"] = mean(w["start_mb"] for w in run["workers"])
        result[f"rows_per_s_{name}"] = run["rows"] / run["seconds"]
    result["ratio"] = result["worker_own_peak_mb_large"] / result["worker_own_peak_mb_small"]
    jpeg, target, emitted = _row_sizes(*data["large"])
    result.update(jpeg_bytes=jpeg, target_bytes_per_row=target, emitted_bytes_per_row=emitted,
                  predicted_own_mb=predicted_mb(preset.worker_buffer, preset.worker_chunk_rows, preset.batch, jpeg, target,
                                                emitted, PREFETCH_BATCHES))
    return result
