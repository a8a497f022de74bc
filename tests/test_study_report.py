"""The `make study` report on numbers with a known answer: codec deltas paired over seeds, the codec rule, the
single-seed tables, and the cost model's formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tec_pipeline.errors import UserError
from tec_pipeline.repro import cost, study
from tec_pipeline.repro.cost import StepFlops, count_step_flops, extrapolate
from tec_pipeline.repro.study_report import write_study_report

LINPROBE = {"fp32": (70.0, 72.0, 71.0), "fp16": (70.1, 71.8, 71.0), "int8": (69.8, 71.9, 70.7),
            "ecq": (69.0, 71.5, 70.1)}
BYTES = {"fp32": 28_000, "fp16": 14_000, "int8": 7_500, "ecq": 4_000}


def _eval(root: Path, run: str, linprobe: float, knn: float, cpu: float) -> None:
    (root / "evals" / f"{run}-linprobe.json").write_text(json.dumps({"top1": linprobe}))
    (root / "evals" / f"{run}-knn.json").write_text(json.dumps({"top1": knn}))
    (root / "timing" / f"{run}.cpu").write_text(f"{cpu}\n")


@pytest.fixture
def study_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "evals").mkdir()
    (tmp_path / "timing").mkdir()
    for codec, values in LINPROBE.items():
        for seed, value in enumerate(values):
            _eval(tmp_path, f"codec-{codec}-s{seed}", value, value - 10, 100.0)
        (tmp_path / "timing" / f"cache-{codec}.cpu").write_text("30\n")
    (tmp_path / "provenance.txt").write_text("made by `make study` on commit abc1234, started 2026-12-01 17:52 UTC\n")
    _eval(tmp_path, "online-s0", 70.5, 60.5, 150.0)
    _eval(tmp_path, "views-v8-s0", 71.5, 61.0, 100.0)
    _eval(tmp_path, "masks-m2-s0", 70.9, 60.9, 190.0)
    _eval(tmp_path, "size-tec_nano_p4_28-s0", 66.0, 58.0, 60.0)

    def fake_store(root: Path, codec: str) -> dict:
        return {"per_view": BYTES[codec], "raw_fp16_per_view": 14_112, "views": 8 if codec == "fp16" else 2,
                "rows": 4000}

    monkeypatch.setattr(study, "store_bytes_per_view", fake_store)
    # the ViT-B FLOP count takes ~10 s of CPU; the formulas are tested below on known numbers
    monkeypatch.setattr(cost, "count_step_flops", lambda arch, **_: StepFlops(arch, 1e9, 3e9))
    return tmp_path


def test_codec_deltas_are_paired_over_seeds_and_the_rule_picks_the_smallest_within_margin(study_dir: Path) -> None:
    r = study.study_results(study_dir, epochs=6)
    int8 = r["codecs"]["int8"]["linprobe_delta"]
    assert int8["n"] == 3 and int8["mean"] == pytest.approx(-0.2)  # deltas -0.2, -0.1, -0.3
    # sd 0.1, t(0.975, 2) = 4.303: half width 0.2484
    assert (int8["low"], int8["high"]) == (pytest.approx(-0.4484, abs=1e-4), pytest.approx(0.0484, abs=1e-4))
    assert r["codecs"]["ecq"]["linprobe_delta"]["mean"] == pytest.approx(-0.8)
    assert r["default_codec"]["codec"] == "int8" and r["default_codec"]["qualified"] == ["int8", "fp16", "fp32"]
    assert list(r["views"]) == [2, 8] and r["views"][2]["run"] == "codec-fp16-s0"
    assert list(r["sizes"]) == ["tec_nano_p4_28", "tec_micro_p4_28"]  # ordered by parameters
    assert r["cost"]["teacher_share"]["measured_cpu"] == pytest.approx(1 - 100 / 150)


def test_study_report_tables_and_figures(study_dir: Path) -> None:
    report = write_study_report(study_dir, epochs=6).read_text()
    assert "| int8 | 7,500 | 0.531 | 3 | 70.80 ± 1.05 | -0.20 [-0.45, +0.05] |" in report
    assert "Made by `make study` on commit abc1234, started 2026-12-01 17:52 UTC." in report
    assert "Default codec by the rule" in report and "**int8**" in report
    assert "| V = 8 | 71.50 | 61.00 | 100 | `views-v8-s0` |" in report
    assert "| online (a fresh view every epoch) | 70.50 | 60.50 | 150 | `online-s0` |" in report
    assert "| M = 2 | 70.90 | 60.90 | 190 |" in report
    assert "assumed" in report and "GPU-hours" in report
    for png in ("codecs.png", "views_sizes.png"):
        assert (study_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((study_dir / "results.json").read_text())["default_codec"]["codec"] == "int8"


def test_study_report_without_results_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evals").mkdir()
    with pytest.raises(UserError, match="make study"):
        write_study_report(tmp_path, epochs=6)


def test_extrapolation_follows_the_formulas() -> None:
    x = extrapolate(StepFlops("toy", teacher_forward=1.0, student_step=3.0), epochs=300, views=2, images=1000)
    assert x["teacher_share"] == pytest.approx(0.25)
    assert x["saving"] == pytest.approx(1 - (2 * 1 + 300 * 3) / (300 * 4))
    assert x["online_gpu_hours"] == pytest.approx(300 * 1000 * 4 / cost.GPU_FLOPS / 3600)


def test_flop_count_is_per_image_and_the_teacher_share_is_a_fraction() -> None:
    one, two = count_step_flops("tec_pico_p4_16", batch=1), count_step_flops("tec_pico_p4_16", batch=2)
    assert one.teacher_forward == pytest.approx(two.teacher_forward)
    assert one.student_step == pytest.approx(two.student_step, rel=0.05)  # masks keep equal token counts
    assert 0 < one.teacher_share < 1
