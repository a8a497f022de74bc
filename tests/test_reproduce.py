"""`make reproduce` end to end at CI size: every arm trained and evaluated over two seeds, the report (with
paired intervals) and figures written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@needs_fashion_mnist
def test_reproduce_pipeline_writes_report_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    settings = [f"REPRO_OUT={out}", "N_TRAIN=300", "N_TEST=200", "E1=1", "E2=1", "REPRO_ARCH=tec_pico_p4_16",
                "TOPK=4", "REPRO_BATCH=32", "LOADER_WORKERS=0", "SEEDS=0 1"]
    # -j2: the steps are single-threaded here (one compute thread, no loader workers), so two at a time use both
    # cores; make orders them by their file dependencies
    proc = subprocess.run(["make", "-j2", "reproduce", *settings], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"random", "base", "tec-cached", "tec-online", "mae-control"}
    assert results["seeds"] == [0, 1]
    for name, arm in results["arms"].items():
        seeded = name not in ("random", "base")
        assert len(arm["linprobe_top1"]) == (2 if seeded else 1), arm
        assert all(0 < v <= 100 for v in arm["linprobe_top1"] + arm["knn_top1"])
        for cost in ("seconds_per_seed", "cpu_seconds_per_seed"):  # wall and CPU seconds of each trained arm
            assert (arm[cost] is None) == (name == "random") and (arm[cost] or 1) > 0, (name, cost)
    cached = results["arms"]["tec-cached"]
    assert cached["runs"] == ["tec-cached-s0", "tec-cached-s1"] and cached["linprobe_std"] >= 0
    assert cached["linprobe_top1"][0] != cached["linprobe_top1"][1]  # the seed reaches the student
    assert results["cache"]["base_forward_passes"] == 2 * 300  # V=2 views, paid once for every seed
    assert results["store"]["image_views"] == 600
    for comparison in ("TEC − control", "cached − online", "TEC − base"):
        d = results["differences"][comparison]["linprobe"]
        assert d["n"] == 2 and d["low"] <= d["mean"] <= d["high"], d
    report = (out / "report.md").read_text()
    assert "| MAE base, 1 epochs (`base`) | 1 |" in report and "## Commands" in report and "tec cache-targets" in report
    assert "CPU s per seed" in report and "mean [95 % interval]" in report and "| TEC − control |" in report and "± " in report
    assert "**The cache is as good as online**" in report and "Control: 1 more MAE epochs" in report
    for png in ("loss_curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second make has nothing left to do: every step is a finished file target
    again = subprocess.run(["make", "-n", "reproduce", *settings], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "bin/tec " not in again.stdout, again.stdout
    # a deleted evaluation is remade (and the report after it), and nothing else; so is a deleted step under it
    (out / "evals" / "base-knn.json").unlink()
    again = subprocess.run(["make", "-n", "reproduce", *settings], cwd=ROOT, capture_output=True, text=True)
    commands = [line for line in again.stdout.splitlines() if "bin/tec " in line]
    assert again.returncode == 0 and len(commands) == 2, again.stdout
    assert "frozen-eval --checkpoint " + str(out / "base.pth") in commands[0] and " report " in commands[1]
    (out / "evals" / "base-knn.json").touch()
    (out / "tec-cached-s1" / "done").unlink()
    again = subprocess.run(["make", "-n", "reproduce", *settings], cwd=ROOT, capture_output=True, text=True)
    commands = [line for line in again.stdout.splitlines() if "bin/tec " in line]
    assert [c.split("bin/tec ")[1].split()[0] for c in commands] == ["pretrain", "frozen-eval", "report"], commands
    assert "--out " + str(out / "tec-cached-s1") in commands[0]
