"""`tec bench`: every figure of issue 9 in one run, the goals beside them, as JSON and as a Markdown table."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import tec_pipeline
from tec_pipeline.bench.attention import compare_attention
from tec_pipeline.bench.codecs import best_codec, compare_codecs
from tec_pipeline.bench.data import prepare_data
from tec_pipeline.bench.hostpath import GOALS_CPU_MS, compare_host_path
from tec_pipeline.bench.memory import compare_memory
from tec_pipeline.bench.presets import BenchPreset, get_preset
from tec_pipeline.bench.stage1 import compare_stage1
from tec_pipeline.bench.stage2 import compare_stage2
from tec_pipeline.bench.timing import quiet
from tec_pipeline.bench.workers import compare_worker_memory
from tec_pipeline.config import require
from tec_pipeline.devices import available_cores, resolve_device
from tec_pipeline.errors import UserError

log = logging.getLogger(__name__)
QUIET_LOGGERS = ("tec_pipeline.train", "tec_pipeline.store", "tec_pipeline.models", "tec_pipeline.data")
GOALS = {
    "stage2": "cached/online ≥ 0.9 × ideal 1/(1−f)",
    "stage1": "end to end / bare forward ≥ 0.9",
    "codecs": "best codec ≤ 0.30 × raw fp16",
    "attention_targets": "row-sparse faster than full (speedup > 1) at every batch",
    "memory": "10× larger store: peak RSS within 10 %",
    **{f"host_path_{codec}": f"stage-1 host path ≤ {ms} CPU-ms per ViT-B view ({codec})"
       for codec, ms in GOALS_CPU_MS.items()},
    "worker_memory": "ViT-B, default buffer: ≤ 0.5 GB per loader worker; 10× store within 10 %",
}


def host_info(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: CPU count, torch threads, GPU name, load average."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "machine": platform.machine(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()[0]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def goals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal: its statement, the measured value it is judged on, and whether it is met."""
    s2, s1, mem, att = result["stage2"], result["stage1"], result["memory"], result["attention_targets"]
    wm = result["worker_memory"]
    best = best_codec(result["codecs"])
    values = {
        "stage2": (s2["efficiency"], s2["efficiency"] >= 0.9),
        "stage1": (s1["ratio"], s1["ratio"] >= 0.9),
        "codecs": (result["codecs"][best]["ratio_to_fp16"], result["codecs"][best]["ratio_to_fp16"] <= 0.30),
        "attention_targets": (min(f["speedup"] for f in att["batches"].values()), att["faster_at_every_batch"]),
        "memory": (mem["ratio"], mem["ratio"] <= 1.10),
        **{f"host_path_{codec}": (result["host_path"]["codecs"][codec]["host_ms_per_view"],
                                  result["host_path"]["codecs"][codec]["host_ms_per_view"] <= ms)
           for codec, ms in GOALS_CPU_MS.items()},
        "worker_memory": (wm["worker_own_peak_mb_large"], wm["worker_own_peak_mb_large"] <= 500 and wm["ratio"] <= 1.10),
    }
    return {name: {"goal": GOALS[name], "value": value, "met": bool(met)} for name, (value, met) in values.items()}


def _measure(preset: BenchPreset, device: torch.device, work: Path) -> dict[str, Any]:
    """Every comparison, in order, with the seconds each section took ('section_seconds')."""
    out: dict[str, Any] = {"section_seconds": {}}
    clock = time.perf_counter()

    def section(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        out["section_seconds"][name] = now - clock
        log.info("bench: %s measured in %.1f s", name, now - clock)
        clock = now

    data = prepare_data(preset, work / "data")
    out["data"] = {"source": data.source, "rows": data.rows, "views": preset.views, "k": preset.topk}
    section("data")
    out["stage1"], store, large_store = compare_stage1(data, preset, device, work)
    section("stage1")
    out["host_path"] = compare_host_path(work, device, preset.host_path_images, preset.loader_workers)
    section("host_path")
    out["codecs"] = compare_codecs(data, preset, device)
    section("codecs")
    out["attention_targets"] = compare_attention(preset, device)
    section("attention_targets")
    out.update(compare_stage2(data, preset, device.type, store, work))
    section("stage2")
    out["memory"] = compare_memory(data, preset, device, store, large_store, work)
    section("memory")
    out["worker_memory"] = compare_worker_memory(preset, work)
    section("worker_memory")
    return out


def run_bench(preset_name: str, device_name: str = "auto", quick: bool = False, threads: int | None = None,
              work_dir: str | None = None, reps: int | None = None) -> dict[str, Any]:
    """Build the preset's data, base model and stores in a temporary directory and measure everything.

    threads: torch intra-op threads for the whole benchmark (default `bench_threads`), restored afterwards;
    reps: repetitions of every timed comparison (default: the preset's).
    """
    preset = get_preset(preset_name, quick)
    device = resolve_device(device_name)
    require(threads is None or threads >= 1, f"--threads must be >= 1, got {threads}")
    require(reps is None or reps >= 1, f"--reps must be >= 1, got {reps}")
    preset = dataclasses.replace(preset, reps=reps) if reps else preset
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or bench_threads(preset, device))
    try:
        return _run(preset, device, work_dir)
    finally:
        torch.set_num_threads(previous)


def bench_threads(preset: BenchPreset, device: torch.device) -> int:
    """Default intra-op threads: on CPU the cores the loader workers leave (as stage 1 runs), else torch's."""
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), available_cores() - preset.loader_workers))


def _run(preset: BenchPreset, device: torch.device, work_dir: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    result: dict[str, Any] = {"preset": preset.name, "device": str(device), "torch": torch.__version__,
                              "tec_pipeline": tec_pipeline.__version__, "arch": preset.arch,
                              "host": host_info(device)}
    if work_dir:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    # the stages' INFO lines, once per run, would drown the benchmark's own progress lines
    with tempfile.TemporaryDirectory(prefix="tec-bench-", dir=work_dir) as tmp, quiet(*QUIET_LOGGERS):
        result.update(_measure(preset, device, Path(tmp)))
    result["goals"] = goals(result)
    if hasattr(os, "getloadavg"):
        result["host"]["load_average_end"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - start
    return result


def check_writable(path: str | os.PathLike[str]) -> None:
    """UserError unless a file can be written at `path` (its folder is created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".tmp"), "w"):
            pass
        path.with_name(path.name + ".tmp").unlink()
    except OSError as e:
        raise UserError(f"cannot write --json {path}: {e.strerror or e}; choose another path") from None


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """The result as indented JSON at `path`, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _stage2_text(s2: dict[str, Any]) -> str:
    return (f"{s2['cached_img_s']:.0f} / {s2['online_img_s']:.0f} img/s = {s2['ratio']:.2f}, f = {s2['teacher_share']:.2f}, "
            f"ideal {s2['ideal_ratio']:.2f} → {s2['efficiency']:.2f} of ideal")


def markdown_table(result: dict[str, Any]) -> str:
    """The README's Performance table: figure, measured value, goal, met."""
    s2, s1, mem, att, g = (result[k] for k in ("stage2", "stage1", "memory", "attention_targets", "goals"))
    best = best_codec(result["codecs"])
    fp16, hp = result["codecs"]["fp16"], result["host_path"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in s1["parts_ms_per_image"].items())
    masks = "; ".join(f"M={m}: {f['img_s']:.0f} img/s, {f['target_bytes_per_sample'] / 1e3:.1f} kB/sample"
                      for m, f in result["multimask"].items())
    rows = [
        ("stage 2: cached / online step throughput",
         f"steady state {_stage2_text(s2)}; whole epochs {_stage2_text(s2['whole_epoch'])}", GOALS["stage2"],
         _yes(g["stage2"]["met"])),
        ("stage 1: end to end / bare forward",
         f"{s1['end_to_end_img_s']:.0f} / {s1['bare_forward_img_s']:.0f} img/s = {s1['ratio']:.2f} for "
         f"{s1['images']} views; {s1['ratio_large']:.2f} for {s1['images_large']} (serial ms/img: {parts})",
         GOALS["stage1"], _yes(g["stage1"]["met"])),
        ("bytes per view (ratio to raw fp16)",
         f"fp16 {fp16['bytes_per_view'] / 1e3:.1f} kB; best {best} {result['codecs'][best]['bytes_per_view'] / 1e3:.1f} kB "
         f"= {result['codecs'][best]['ratio_to_fp16']:.3f}", GOALS["codecs"], _yes(g["codecs"]["met"])),
        ("row-sparse vs full attention targets",
         "; ".join(f"B={b}: {f['speedup']:.2f}× (last block {f['last_block_speedup']:.2f}×)"
                   for b, f in att["batches"].items()), GOALS["attention_targets"], _yes(g["attention_targets"]["met"])),
        (f"stage-2 peak RSS, {result['memory']['rows_large'] // result['memory']['rows_small']}× store",
         f"{mem['rss_small_mb']:.0f} → {mem['rss_large_mb']:.0f} MB = {mem['ratio']:.2f} (above the "
         f"{mem['rss_imports_mb']:.0f} MB of imports: {mem['working_set_small_mb']:.0f} → {mem['working_set_large_mb']:.0f} MB)",
         GOALS["memory"], _yes(g["memory"]["met"])),
        _worker_row(result),
        ("stage 2: loader wait, epoch start vs rest",
         f"first {s2['epoch_start_wait']['first_steps']} steps of each epoch "
         f"{s2['epoch_start_wait']['first_steps_wait']:.3f} vs other steps {s2['epoch_start_wait']['other_steps_wait']:.3f}"
         " of the step time (cached)", "(reported)", "–"),
        ("masks per view", masks, "(reported)", "–"),
        *[_host_path_row(hp, codec, f, g) for codec, f in [*hp["codecs"].items(), ("fp16", hp["pil_replay_fp16"])]],
    ]
    lines = ["| figure | measured | goal | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def _host_path_row(hp: dict[str, Any], codec: str, f: dict[str, Any],
                   g: dict[str, dict[str, Any]]) -> tuple[str, str, str, str]:
    """One host-path run; a goal beside it only where one is set and the run used the replay it is judged on."""
    goal = f"host_path_{codec}"
    judged = goal in g and f["replay"] == hp["replay"]
    return (f"stage-1 host path, {codec}, {f['replay']} replay (stand-in ViT-B, {hp['images']} JPEGs 500×375, V=2)",
            f"host {f['host_ms_per_view']:.2f} CPU-ms/view (all {f['cpu_ms_per_view']:.2f}, of which device side "
            f"{f['device_ms_per_view']:.2f}), {f['views_s']:.0f} views/s",
            GOALS[goal] if judged else "(reported)", _yes(g[goal]["met"]) if judged else "–")


def _worker_row(result: dict[str, Any]) -> tuple[str, str, str, str]:
    wm = result["worker_memory"]
    factor = wm["rows_large"] // wm["rows_small"]
    return (f"stage-2 loader worker, ViT-B, {factor}× store",
            f"adds {wm['worker_own_peak_mb_small']:.0f} → {wm['worker_own_peak_mb_large']:.0f} MB = {wm['ratio']:.2f} "
            f"(buffer {wm['shuffle_buffer']} rows, batch {wm['batch']}; formula {wm['predicted_own_mb']:.0f} MB; "
            f"VmHWM {wm['worker_peak_mb_large']:.0f} MB with {wm['worker_start_mb_large']:.0f} MB shared at fork)",
            GOALS["worker_memory"], _yes(result["goals"]["worker_memory"]["met"]))


def codec_table(result: dict[str, Any]) -> str:
    """Per codec: bytes per view, ratio to raw fp16, encode/decode MB/s, max abs error."""
    lines = ["| codec | bytes/view | ratio to fp16 | encode MB/s | decode MB/s | max abs err (features) |",
             "|---|---|---|---|---|---|"]
    for name, c in result["codecs"].items():
        lines.append(f"| {name} | {c['bytes_per_view']:,.0f} | {c['ratio_to_fp16']:.3f} | {c['encode_mb_s']:.0f} | "
                     f"{c['decode_mb_s']:.0f} | {c['max_abs_err']:.3g} |")
    return "\n".join(lines)
