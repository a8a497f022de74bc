"""`tec bench`: it runs and writes every documented figure; its measuring pieces measure what they claim."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import cli
from tec_pipeline.bench.memory import peak_rss_mb
from tec_pipeline.bench.stage2 import run_figures, teacher_clock
from tec_pipeline.bench.timing import interleaved
from tec_pipeline.train import pretrain

# the minimum: every key of every section
REQUIRED = {
    "stage2": ("cached_img_s", "online_img_s", "ratio", "teacher_share", "ideal_ratio"),
    "stage1": ("end_to_end_img_s", "bare_forward_img_s", "ratio"),
    "attention_targets": ("row_sparse_ms", "full_ms", "speedup"),
    "memory": ("rss_small_mb", "rss_large_mb", "ratio"),
}
CODEC_KEYS = ("bytes_per_view", "ratio_to_fp16", "encode_mb_s", "decode_mb_s", "max_abs_err")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_quick_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "bench.json"
    cli.main(["bench", "--preset", "tiny", "--quick", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny-quick" and result["device"] == "cpu" and result["torch"] == torch.__version__
    for section, keys in REQUIRED.items():
        for key in keys:
            assert _positive(result[section][key]), (section, key, result[section].get(key))
    assert "fp16" in result["codecs"]
    for name, figures in result["codecs"].items():
        assert all(_positive(figures[k]) or k == "max_abs_err" for k in CODEC_KEYS), name
    assert result["codecs"]["fp16"]["ratio_to_fp16"] == pytest.approx(1.0, abs=1e-3)
    assert result["codecs"]["fp32"]["max_abs_err"] == 0.0 < result["codecs"]["fp16"]["max_abs_err"]
    for s2 in (result["stage2"], result["stage2"]["whole_epoch"]):
        assert 0 < s2["teacher_share"] < 1 and s2["ideal_ratio"] == pytest.approx(1 / (1 - s2["teacher_share"]))
    assert set(result["multimask"]) == {"1", "2", "4"}
    per_sample = {m: result["multimask"][m]["target_bytes_per_sample"] for m in ("1", "2", "4")}
    assert per_sample["1"] == pytest.approx(2 * per_sample["2"]) == pytest.approx(4 * per_sample["4"])
    assert all(_positive(f["img_s"]) for f in result["multimask"].values())
    mem = result["memory"]
    assert mem["rows_large"] == 4 * mem["rows_small"] and mem["ratio"] == pytest.approx(mem["rss_large_mb"] / mem["rss_small_mb"])
    assert set(result["goals"]) == {"stage2", "stage1", "codecs", "attention_targets", "memory", "host_path_fp16",
                                    "host_path_ecq", "worker_memory"}
    host = result["host_path"]
    assert host["images"] == 32 and set(host["codecs"]) == {"fp16", "int8", "ecq"}
    runs = [*host["codecs"].values(), host["pil_replay_fp16"]]
    assert all(_positive(f["cpu_ms_per_view"]) and _positive(f["views_s"]) and f["views"] == 64 for f in runs)
    assert all(0 < f["device_ms_per_view"] < f["cpu_ms_per_view"] and f["host_ms_per_view"] ==
               pytest.approx(f["cpu_ms_per_view"] - f["device_ms_per_view"]) for f in runs)  # a CPU "device" here
    assert [f["replay"] for f in runs] == ["torch", "torch", "torch", "pil"]
    assert result["goals"]["host_path_fp16"]["value"] == host["codecs"]["fp16"]["host_ms_per_view"]
    workers = result["worker_memory"]
    assert workers["rows_large"] == 4 * workers["rows_small"] and workers["target_bytes_per_row"] > 370_000
    assert all(_positive(workers[f"worker_own_peak_mb_{k}"]) for k in ("small", "large"))
    assert workers["worker_peak_mb_large"] > workers["worker_own_peak_mb_large"]
    wait = result["stage2"]["epoch_start_wait"]
    assert wait["first_steps"] >= 1 and 0 <= wait["first_steps_wait"] <= 1 and 0 <= wait["other_steps_wait"] <= 1
    assert not list((tmp_path / "work").iterdir())  # every temporary file is gone


@pytest.mark.parametrize("args", [["--preset", "huge"], ["--device", "tpu"], ["--threads", "0"], ["--reps", "0"],
                                  ["--json", "{tmp}/a-file/b.json"],
                                  pytest.param(["--device", "cuda"], marks=pytest.mark.skipif(
                                      torch.cuda.is_available(), reason="CUDA is available here"))])
def test_bad_input_one_line_exit_2(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    json_args = [] if "--json" in args else ["--json", str(tmp_path / "b.json")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *args, *json_args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
    assert not (tmp_path / "b.json").exists()


def test_teacher_clock_times_every_target_call_and_restores() -> None:
    original = pretrain.stored_targets
    model = torch.nn.Linear(1, 1)  # never called: the wrapped function only has to be reached
    calls = []
    pretrain.stored_targets = lambda *a, **k: calls.append(a) or {}  # type: ignore[assignment]
    try:
        stub = pretrain.stored_targets
        with pytest.raises(RuntimeError), teacher_clock("cpu") as seconds:
            pretrain.stored_targets(model, None, 1, 1)
            pretrain.stored_targets(model, None, 1, 1)
            raise RuntimeError("a failing run")
        assert len(calls) == 2 and len(seconds) == 2 and all(s >= 0 for s in seconds)
        assert pretrain.stored_targets is stub
    finally:
        pretrain.stored_targets = original


def test_run_figures_skip_the_warmup_epoch_and_time_steady_steps(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.csv"
    # 3 epochs of 2 steps, batch 10: (step seconds, loader-wait fraction, teacher seconds)
    steps = [(1, 0.5, 9), (1, 0, 9), (3, 0.5, 1), (1, 0, 0.5), (2, 0.25, 1), (1, 0, 0.25)]
    metrics.write_text("step,epoch,lr,loss,img_per_s,data_wait\n"
                       + "".join(f"{i + 1},{(i + 1) / 2},0.1,1.0,{10 / s},{w}\n" for i, (s, w, _) in enumerate(steps)))
    result = run_figures(metrics, teacher_s=[t for *_, t in steps], per_epoch=2, batch=10)
    # steady state: steps 4 and 6 (each epoch's first step and the warm-up epoch left out)
    assert result.steady.img_s == pytest.approx(20 / 2)
    assert result.steady.teacher_share == pytest.approx(0.75 / 2) and result.steady.data_wait == 0
    # whole epochs: steps 3 to 6
    assert result.epoch.img_s == pytest.approx(40 / 7)
    assert result.epoch.teacher_share == pytest.approx(2.75 / 7)
    assert result.epoch.data_wait == pytest.approx(2 / 7)
    # each timed epoch's first step (of 2: min(20, 2 // 2)) against the rest
    assert result.start_steps == 1 and result.start_wait == pytest.approx(2 / 5) and result.rest_wait == 0


def test_interleaved_rotates_the_order() -> None:
    order: list[str] = []
    results = interleaved({"a": lambda: order.append("a") or 1, "b": lambda: order.append("b") or 2}, reps=3)
    assert results == {"a": [1, 1, 1], "b": [2, 2, 2]}
    assert order == ["a", "b", "b", "a", "a", "b"]


def test_peak_rss_is_the_childs_own_not_the_parents() -> None:
    ballast = torch.ones(400 * 2**20 // 4)  # 400 MB resident in this process
    assert ballast.sum() > 0
    child = peak_rss_mb(["--help"])  # cli only: click, no torch
    assert 0 < child["imports_mb"] <= child["peak_mb"] < 200


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path: Path) -> None:
    from tec_pipeline.bench.gpu_check import main

    out = tmp_path / "gpu-check.json"
    main(["--device", "cpu", "--smoke", "--out", str(out), "--work-dir", str(tmp_path)])
    result = json.loads(out.read_text())
    assert result["ran_on_gpu"] is False and result["device"] == "cpu"
    s1 = result["stage1"]
    assert _positive(s1["bare_forward_img_s"]) and s1["ratio"] == pytest.approx(
        s1["end_to_end_img_s"] / s1["bare_forward_img_s"])
    agree = result["agreement_bf16_vs_fp32"]
    assert 0 < agree["feature_max_abs_err"] < 10 and 0 < agree["topk_overlap_mean"] <= 1
    assert result["device_codecs_bit_exact"] == {"int8_features": True, "ecq_features": True,
                                                 "ecq_attention": True}
    assert all(_positive(result["stage2"][k]) for k in ("cached_img_s", "online_img_s", "ratio"))
