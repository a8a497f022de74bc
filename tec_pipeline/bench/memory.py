"""Stage-2 peak memory with a store and with one `memory_factor` times larger.

Each measurement is a fresh `tec pretrain` process (one epoch, cached mode, loader in the main process so one
process holds everything) that reports its own peak resident set size (bench/child.py). The kernel's
`ru_maxrss` of a child (`os.wait4`, RUSAGE_CHILDREN) is no good here: it also counts the parent's resident set
at the fork, so every child of the benchmark process would read at least as large as the benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import torch

from tec_pipeline.bench import child
from tec_pipeline.bench.data import BenchData
from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.bench.timing import interleaved


def peak_rss_mb(tec_args: list[str]) -> dict[str, float]:
    """{'peak_mb', 'imports_mb'}: peak RSS of `tec ARGS` in a fresh interpreter, and of its imports alone.

    RuntimeError with the command's last line of output if it fails.
    """
    threads = str(torch.get_num_threads())  # the child computes with the benchmark's thread count
    env = {**os.environ, "TEC_NO_PROGRESS": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak_rss_mb"
        proc = subprocess.run([sys.executable, "-c", child.COMMAND, str(report), *tec_args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env, check=False)
        if proc.returncode != 0 or not report.is_file():
            lines = proc.stderr.strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"tec {tec_args[0]} exited with {proc.returncode}: {lines[-1]}")
        return json.loads(report.read_text())


def pretrain_args(shards: Path, store: Path, out: Path, preset: BenchPreset, device: str) -> list[str]:
    """`tec pretrain` for one cached epoch over the whole store."""
    return ["pretrain", "--targets", str(store), "--shards", str(shards), "--out", str(out), "--epochs", "1",
            "--batch-size", str(preset.batch), "--topk", str(preset.topk), "--workers", "0", "--no-resume",
            "--device", device]


def compare_memory(data: BenchData, preset: BenchPreset, device: torch.device, store: Path, large_store: Path,
                   work: Path) -> dict[str, Any]:
    """Peak RSS of stage 2 on `store` (the shards') and `large_store` (the large shards'), preset.memory_reps
    fresh processes each, interleaved; medians.

    rss_imports_mb is the peak once the command's modules are imported, before any work: the working sets
    are the peaks above it.
    """
    def run(shards: Path, target: Path, name: str) -> dict[str, float]:
        out = work / f"memory-{name}"
        try:
            return peak_rss_mb(pretrain_args(shards, target, out, preset, device.type))
        finally:
            shutil.rmtree(out, ignore_errors=True)

    rss = interleaved({"small": lambda: run(data.shards, store, "small"),
                       "large": lambda: run(data.large_shards, large_store, "large")}, preset.memory_reps)
    small, large = (median(r["peak_mb"] for r in rss[k]) for k in ("small", "large"))
    imports = median(r["imports_mb"] for r in rss["small"] + rss["large"])
    return {"rss_small_mb": small, "rss_large_mb": large, "ratio": large / small, "rss_imports_mb": imports,
            "working_set_small_mb": small - imports, "working_set_large_mb": large - imports,
            "working_set_ratio": (large - imports) / max(small - imports, 1e-9),
            "rows_small": data.rows, "rows_large": data.rows * preset.memory_factor,
            "rss_small_mb_runs": [r["peak_mb"] for r in rss["small"]],
            "rss_large_mb_runs": [r["peak_mb"] for r in rss["large"]], "reps": preset.memory_reps}
