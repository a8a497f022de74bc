"""The views ablation report: one row per stored V, the online student as reference, a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tec_pipeline.errors import UserError
from tec_pipeline.repro.ablation import write_ablation_report


def test_ablation_report_table_and_plot(tmp_path: Path) -> None:
    evals = tmp_path / "evals"
    evals.mkdir()
    scores = {"cached-v1": (60.0, 50.0), "cached-v2": (61.5, 51.0), "cached-v8": (63.0, 52.5), "online": (63.25, 52.0)}
    for arm, (lp, knn) in scores.items():
        (evals / f"{arm}-linprobe.json").write_text(json.dumps({"top1": lp}))
        (evals / f"{arm}-knn.json").write_text(json.dumps({"top1": knn}))
    report = write_ablation_report(tmp_path, epochs=8).read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| cached") or ln.startswith("| online")]
    assert rows == ["| cached, V = 1 | 1 | 60.00 | 50.00 |", "| cached, V = 2 | 2 | 61.50 | 51.00 |",
                    "| cached, V = 8 | 8 | 63.00 | 52.50 |", "| online | 8 | 63.25 | 52.00 |"]
    assert (tmp_path / "views.png").read_bytes()[:4] == b"\x89PNG"


def test_ablation_report_without_results_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evals").mkdir()
    with pytest.raises(UserError, match="make ablate-views"):
        write_ablation_report(tmp_path, epochs=8)
