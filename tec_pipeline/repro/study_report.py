"""The `make study` report: S/report.md, S/results.json and two figures, from repro/study.py's numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tec_pipeline.config import require
from tec_pipeline.repro.cost import GPU_FLOPS
from tec_pipeline.repro.report import save_figure
from tec_pipeline.repro.study import (
    CODEC_MARGIN,
    CODECS,
    DEFAULT_ARM,
    METHODS,
    REFERENCE_CODEC,
    study_results,
)

log = logging.getLogger(__name__)


def _f(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _text(d: dict[str, Any] | None) -> str:
    return "—" if d is None else d["text"]


def codec_table(r: dict[str, Any]) -> list[str]:
    lines = ["| codec | stored B / view | × raw fp16 | seeds | linear probe | Δ vs fp32 [95 %] | kNN | "
             "Δ vs fp32 [95 %] | cache CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    cpu = r["cost"]["cpu_seconds"]
    for codec in CODECS:
        c = r["codecs"][codec]
        store = c["store"]
        per_view = f"{store['per_view']:,.0f}" if store else "—"
        ratio = f"{store['per_view'] / store['raw_fp16_per_view']:.3f}" if store else "—"
        cache = cpu.get(f"cache-{codec}")
        if cache is not None and store and store["views"] != 2:
            cache_text = f"{cache:.0f} ({store['views']} views)"
        else:
            cache_text = _f(cache, ".0f")
        lines.append(f"| {codec} | {per_view} | {ratio} | {len(c['top1'])} | {_text(c['linprobe_summary'])} | "
                     f"{_text(c['linprobe_delta']) if codec != REFERENCE_CODEC else 'reference'} | "
                     f"{_text(c['knn_summary'])} | {_text(c['knn_delta']) if codec != REFERENCE_CODEC else 'reference'}"
                     f" | {cache_text} |")
    return lines


def _single_table(header: str, rows: dict[Any, dict[str, Any]], label: Any) -> list[str]:
    lines = [f"| {header} | linear probe | kNN | training CPU s | run |", "|---|---|---|---|---|"]
    for key, row in rows.items():
        lines.append(f"| {label(key, row)} | {_f(row['linprobe'])} | {_f(row['knn'])} | "
                     f"{_f(row['train_cpu_s'], '.0f')} | `{row['run']}` |")
    return lines


def cost_lines(r: dict[str, Any]) -> list[str]:
    c = r["cost"]
    share, x = c["teacher_share"], c["imagenet_vit_b"]
    forwards = ", ".join(f"{name}: {n:,}" for name, n in c["base_forward_passes"].items())
    cpu = c["cpu_seconds"]
    groups = {"stores (stage 1)": [s for s in cpu if s.startswith("cache-")],
              "training": [s for s in cpu if not s.startswith(("cache-", "eval-"))],
              "evaluation": [s for s in cpu if s.startswith("eval-")]}
    group_text = "; ".join(f"{name} {sum(cpu[s] for s in steps):,.0f} s over {len(steps)} steps"
                           for name, steps in groups.items())
    fl = c["flops"]
    return [
        f"Base-model forward passes ({c['n_train']:,} images, {c['epochs']} student epochs): {forwards}.", "",
        f"Measured CPU seconds (user + system of every process of a step; per step in results.json): "
        f"{group_text}; {sum(cpu.values()):,.0f} s in all.", "",
        "The base model's share f of an online step:", "",
        "| f | value | how |", "|---|---|---|",
        f"| measured, micro | {_f(share['measured_cpu'], '.3f')} | 1 − CPU s of `{DEFAULT_ARM}` / CPU s of "
        "`online-s0` (the same student, epochs and seed; loader work included) |",
        f"| FLOP model, micro | {share['flops_micro']:.3f} | F_t = {fl['micro']['teacher_forward'] / 1e6:.1f} MFLOP, "
        f"F_s = {fl['micro']['student_step'] / 1e6:.1f} MFLOP per image (repro/cost.py) |",
        f"| FLOP model, ViT-B/16 | {share['flops_vit_b']:.3f} | F_t = {fl['vit_b']['teacher_forward'] / 1e9:.1f} "
        f"GFLOP, F_s = {fl['vit_b']['student_step'] / 1e9:.1f} GFLOP per image |", "",
        f"ImageNet-1k ({x['images']:,} images), ViT-B/16 base and student, {x['epochs']} epochs, V = {x['views']}, "
        f"on one {x['gpu']}:", "",
        "| | GPU-hours |", "|---|---|",
        f"| online TEC: E · N · (F_t + F_s) | {x['online_gpu_hours']:.1f} |",
        f"| stage 1, the cache: V · N · F_t | {x['cache_gpu_hours']:.2f} |",
        f"| stage 2 from the cache: E · N · F_s | {x['cached_student_gpu_hours']:.1f} |",
        f"| cached in all | {x['cached_total_gpu_hours']:.1f} ({x['saving']:.0%} less; every further student "
        "from the same cache pays only stage 2) |", "",
        f"Method: FLOPs counted by torch's FlopCounterMode on this project's models (matmuls, convolutions, "
        f"attention; optimiser and data loading left out), divided by an assumed sustained {GPU_FLOPS / 1e12:.0f} "
        "TFLOP/s. The assumption is the weak part (no GPU was lent to measure it: `make gpu-check` would); the "
        "ratio between the rows does not depend on it. Where the measured share at the study's size is below the "
        "FLOP share, the difference is work both modes pay that FLOPs do not count (decoding and replaying "
        "views, the optimiser, Python): the FLOP-based saving is then an upper bound, reached as matmuls "
        "dominate the step.",
    ]


def _plot_codecs(root: Path, r: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, method in zip(axes, METHODS, strict=True):
        for codec in CODECS:
            c = r["codecs"][codec]
            d = c[f"{method}_delta"] if codec != REFERENCE_CODEC else {"mean": 0.0, "low": 0.0, "high": 0.0}
            if c["store"] is None or d is None:
                continue
            low, high = d["low"] if d["low"] is not None else d["mean"], d["high"] if d["high"] is not None else d["mean"]
            ax.errorbar(c["store"]["per_view"] / 1000, d["mean"], yerr=[[d["mean"] - low], [high - d["mean"]]],
                        fmt="o", capsize=4)
            ax.annotate(codec, (c["store"]["per_view"] / 1000, d["mean"]), textcoords="offset points", xytext=(6, 4))
        ax.axhspan(-CODEC_MARGIN, CODEC_MARGIN, color="0.9")
        ax.axhline(0, color="0.5", lw=1)
        ax.set(xlabel="stored kB per view", ylabel=f"{method} Δ vs fp32 (points)", title=f"{method}: mean, 95 % interval")
    return save_figure(fig, root / "codecs.png")


def _plot_views_and_sizes(root: Path, r: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    views = {v: row for v, row in r["views"].items() if row["linprobe"] is not None}
    for method, style in (("linprobe", "o-"), ("knn", "s-")):
        if views:
            axes[0].plot(list(views), [row[method] for row in views.values()], style, label=f"cached, {method}")
            if r["online"][method] is not None:
                axes[0].axhline(r["online"][method], ls="--", lw=1, color=axes[0].lines[-1].get_color(),
                                label=f"online, {method}")
        sizes = [row for row in r["sizes"].values() if row[method] is not None]
        axes[1].plot([row["params"] / 1e6 for row in sizes], [row[method] for row in sizes], style, label=method)
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="stored views V", ylabel="top-1 (%)", title=f"views ({r['epochs']} epochs, seed 0)")
    axes[1].set(xlabel="student encoder parameters (M)", ylabel="top-1 (%)", title="students from one cache (seed 0)")
    for ax in axes:
        ax.legend(fontsize=7)
    return save_figure(fig, root / "views_sizes.png")


def write_study_report(root: str | Path, epochs: int) -> Path:
    """Write S/report.md, S/results.json, S/codecs.png and S/views_sizes.png; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    root = Path(root)
    require((root / "evals").is_dir() and any((root / "evals").glob("*-knn.json")),
            f"{root}/evals holds no results; run `make study` first")
    r = study_results(root, epochs)
    (root / "results.json").write_text(json.dumps(r, indent=1, default=str))
    codec_png, views_png = _plot_codecs(root, r), _plot_views_and_sizes(root, r)
    choice = r["default_codec"]
    commands = (root / "commands.sh").read_text().strip() if (root / "commands.sh").is_file() else ""
    provenance = root / "provenance.txt"
    made = provenance.read_text().strip() if provenance.is_file() else ""
    lines = [
        "# `make study`: what the cache keeps, and what it costs", "",
        *([made[:1].upper() + made[1:] + ".", ""] if made else []),
        f"{r['n_train']:,} Fashion-MNIST training images, the reproduction's MAE base model, TEC students of "
        f"{epochs} epochs. Accuracy: top-1 (%) of frozen encoders on the test split, linear probe (L-BFGS) and "
        "kNN. Paired deltas are over seeds (Student-t 95 % interval); rows of one seed have no interval and "
        "differences of about a point between them are within seed-to-seed spread (the codec rows show its size).",
        "", "## Codecs (V = 2)", "", *codec_table(r), "",
        f"Default codec by the rule ({choice['rule']}, the smallest such store): **{choice['codec'] or 'none'}** "
        f"(qualified: {', '.join(choice['qualified']) or 'none'}).", "", f"![codecs]({codec_png})", "",
        "## Stored views against online", "",
        *_single_table("stored views", {**r["views"], "online": r["online"]},
                       lambda k, _: "online (a fresh view every epoch)" if k == "online" else f"V = {k}"), "",
        "## Masks per view", "", *_single_table("masks per view", r["masks"], lambda k, _: f"M = {k}"), "",
        "## Students of three sizes from one cache", "",
        *_single_table("student", r["sizes"], lambda k, row: f"{k} ({row['params'] / 1e6:.2f} M)"), "",
        f"![views and sizes]({views_png})", "", "## Cost", "", *cost_lines(r), "",
        "## Commands", "", "```sh", commands, "```",
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", path)
    return path
