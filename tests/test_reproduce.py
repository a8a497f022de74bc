"""`make reproduce` end to end at CI size: every arm trained and evaluated, the report and figures written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


@needs_fashion_mnist
def test_reproduce_pipeline_writes_report_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    settings = [f"REPRO_OUT={out}", "N_TRAIN=300", "N_TEST=200", "E1=1", "E2=1", "REPRO_ARCH=tec_pico_p4_16",
                "TOPK=4", "REPRO_BATCH=32", "LOADER_WORKERS=0"]
    proc = subprocess.run(["make", "reproduce", *settings], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"random", "base", "tec-cached", "tec-online", "mae-control"}
    for name, arm in results["arms"].items():
        assert 0 < arm["linprobe_top1"] <= 100 and 0 < arm["knn_top1"] <= 100
        assert (arm["seconds"] is None) == (name == "random") and (arm["seconds"] or 1) > 0
    assert results["arms"]["tec-cached"]["base_forward_passes"] == 2 * 300  # V=2 views, paid once
    assert results["store"]["image_views"] == 600
    report = (out / "report.md").read_text()
    assert "| MAE base, 1 epochs (`base`) |" in report and "## Commands" in report and "tec cache-targets" in report
    for png in ("loss_curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second make has nothing left to do: every step is a finished file target
    again = subprocess.run(["make", "-n", "reproduce", *settings], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "bin/tec " not in again.stdout, again.stdout
