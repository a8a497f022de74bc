"""The command line as a user meets it: pipeline-ordered help, rank-0-only logging, no library log floods."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, needs_fashion_mnist, run_tec

PIPELINE_ORDER = ["make-shards", "index-shards", "mae-pretrain", "cache-targets", "inspect", "verify", "pretrain",
                  "convert", "linprobe", "knn", "frozen-eval", "finetune", "bench", "report"]


def test_help_lists_commands_along_the_pipeline() -> None:
    out = run_tec("--help", check=True).stdout
    positions = [out.index(f"\n  {name} ") for name in PIPELINE_ORDER]
    assert positions == sorted(positions), out
    assert "Stage 1" in out and "Stage 2" in out and "Start with `make-shards`" in out


def test_verbose_does_not_flood_with_pil_debug_lines(image_folder: Path, tmp_path: Path) -> None:
    proc = run_tec("-v", "make-shards", f"imagefolder:{image_folder}", "--out", str(tmp_path / "shards"),
                   check=True)
    lines = proc.stderr.splitlines()
    assert not [ln for ln in lines if ln.startswith(("STREAM", "Importing ", "tEXt", "iCCP"))], proc.stderr[:2000]
    assert len(lines) < 20, proc.stderr


@pytest.mark.slow
@needs_fashion_mnist
def test_only_rank_zero_logs_info_under_torchrun(fmnist_shards: Path, pico_base: Path, tmp_path: Path) -> None:
    # online pretrain: every rank loads the base model, which logs one INFO line about it
    args = ["pretrain", "--base-model", str(pico_base), "--topk", "4", "--shards", str(fmnist_shards), "--out",
            str(tmp_path / "run"), "--epochs", "1", "--batch-size", "16", "--limit", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEC_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "cli.py", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("base model ") == 1, text  # each rank loads it; only rank 0 says so
    assert text.count("effective batch") == 1 and "2 ranks" in text, text
