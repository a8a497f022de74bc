"""The reproduction report: results over seeds with intervals, loss curves, accuracy chart, commands, configs.

The numbers come from `repro/results.py` (what each file of the run directory means is documented there); this
module turns them into R/report.md, R/results.json, R/loss_curves.png and R/accuracy.png.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from tec_pipeline.config import require
from tec_pipeline.repro.results import COMPARISONS, METHODS, claims, results

log = logging.getLogger(__name__)
# what the control arm is (reproduce.mk: `mae-pretrain --init-from base.pth --init-optimizer --epochs E2`)
CONTROL = ("Control: {e2} more MAE epochs started from the base model's final weights and optimizer state, as a "
           "new run with its own schedule ({warmup} warm-up epochs, cosine over {e2} epochs), so it trains as many "
           "epochs as each TEC student; it is not one uninterrupted {e1}+{e2}-epoch MAE schedule.")


def control_sentence(root: Path, e1: int, e2: int, seed: int) -> str:
    """What the control arm is, with the warm-up its run recorded (config.yaml)."""
    cfg = root / f"mae-control-s{seed}" / "config.yaml"
    warmup = yaml.safe_load(cfg.read_text()).get("warmup_epochs", "?") if cfg.is_file() else "?"
    return CONTROL.format(e1=e1, e2=e2, warmup=f"{warmup:g}" if isinstance(warmup, (int, float)) else warmup)


def _metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _mean_std(arm: dict[str, Any], method: str) -> str:
    mean, std = arm[f"{method}_mean"], arm[f"{method}_std"]
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if arm["seeds_done"] > 1 else f"{mean:.2f}"


def results_table(r: dict[str, Any]) -> list[str]:
    lines = ["| arm | seeds | linear probe top-1 (mean ± std) | kNN top-1 (mean ± std) | base-model forward passes "
             "| wall s per seed | CPU s per seed |", "|---|---|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {a['label']} (`{name}`) | {a['seeds_done']} | {_mean_std(a, 'linprobe')} | "
                     f"{_mean_std(a, 'knn')} | {a['base_forward_passes']:,} | {_fmt(a['seconds_per_seed'], '.0f')} | "
                     f"{_fmt(a['cpu_seconds_per_seed'], '.0f')} |")
    cache = r["cache"]
    lines.append(f"| target store (`cache-targets`, made once, serves every seed) | — | — | — | "
                 f"{cache['base_forward_passes']:,} | {_fmt(cache['seconds'], '.0f')} | "
                 f"{_fmt(cache.get('cpu_seconds'), '.0f')} |")
    return lines


def differences_table(r: dict[str, Any]) -> list[str]:
    lines = ["| paired difference (points) | linear probe: mean [95 % interval] | kNN: mean [95 % interval] |",
             "|---|---|---|"]
    for name, _, _ in COMPARISONS:
        cells = [(d["text"] if (d := r["differences"][name][m]) else "—") for m in METHODS]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def save_figure(fig: Any, path: Path) -> str:
    """Lay out, write (110 dpi PNG) and close a report figure; its file name, for the markdown link."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plot(root: Path, r: dict[str, Any]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    seeded = [(f"{arm}-s{s}", ax) for s in r["seeds"] for arm, ax in
              (("mae-control", axes[0]), ("tec-cached", axes[1]), ("tec-online", axes[1]))]
    for run, ax in [("mae", axes[0]), *seeded]:
        rows = _metrics(root / run / "metrics.csv")
        if rows:
            ax.plot([x["epoch"] for x in rows], [x["loss"] for x in rows], label=run, lw=1)
    axes[0].set(title="MAE loss (norm-pix MSE)", xlabel="epoch", ylabel="loss")
    axes[1].set(title="TEC loss (feature + attention)", xlabel="epoch", ylabel="loss")
    for ax in axes:
        ax.legend(fontsize=7)
    loss_png = save_figure(fig, root / "loss_curves.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(r["arms"])
    width = 0.38
    for i, m in enumerate(METHODS):
        means = [r["arms"][n][f"{m}_mean"] or 0 for n in names]
        stds = [r["arms"][n][f"{m}_std"] or 0 for n in names]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(names))], means, width, yerr=stds, capsize=3,
                      label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="top-1 (%), mean ± std over seeds", title="Fashion-MNIST test accuracy of frozen encoders")
    lows = [v for n in names for m in METHODS if (v := r["arms"][n][f"{m}_mean"]) is not None]
    if lows:
        ax.set_ylim(max(0, min(lows) - 10), min(100, max(lows) + 5))
    ax.legend()
    return loss_png, save_figure(fig, root / "accuracy.png")


def _configs(root: Path, seed: int) -> list[str]:
    out = []
    for run in ("mae", f"tec-cached-s{seed}", f"tec-online-s{seed}", f"mae-control-s{seed}"):
        cfg = root / run / "config.yaml"
        if cfg.is_file():
            out += [f"`{run}/config.yaml`", "", "```yaml", cfg.read_text().strip(), "```", ""]
    return out


def _cost_line(r: dict[str, Any]) -> str:
    tec, control, cache = (r["arms"]["tec-cached"]["seconds_per_seed"], r["arms"]["mae-control"]["seconds_per_seed"],
                           r["cache"]["seconds"])
    if None in (tec, control, cache):
        return "Cost: timings missing."
    return (f"Cost per seed: TEC from the cache {tec:.0f} s of training (+ {cache:.0f} s once for the store, shared "
            f"by every seed and student), the control {control:.0f} s; online TEC runs the base model "
            f"{r['arms']['tec-online']['base_forward_passes']:,} times per seed against "
            f"{r['cache']['base_forward_passes']:,} once for the cache.")


def write_report(root: str | Path, views: int, e1: int, e2: int) -> Path:
    """Write R/report.md (+ results.json and two PNGs); returns the report's path."""
    root = Path(root)
    require((root / "shards" / "train" / "manifest.json").is_file(), f"{root} holds no reproduction run "
            "(no shards/train/manifest.json); run `make reproduce` first")
    r = results(root, views, e1, e2)
    (root / "results.json").write_text(json.dumps(r, indent=1))
    loss_png, acc_png = _plot(root, r)
    store = r["store"]
    store_line = ("no store" if store is None else
                  f"{store['stored_bytes'] / 1e6:.1f} MB for {store['image_views']:,} image-views "
                  f"({store['views']} views x {store['rows']:,} rows, codec {store['codec']}); "
                  f"{store['per_view']:,.0f} B per view stored vs {store['raw_fp16_per_view']:,} B raw fp16")
    commands = (root / "commands.sh").read_text().strip() if (root / "commands.sh").is_file() else ""
    seeds = ", ".join(map(str, r["seeds"])) or "none"
    first = r["seeds"][0] if r["seeds"] else 0
    lines = [
        "# TEC reproduction on Fashion-MNIST", "",
        f"{r['n_train']:,} training images; MAE base E1 = {e1} epochs; TEC students E2 = {e2} epochs from "
        f"V = {views} cached views (cached) or fresh views (online). {control_sentence(root, e1, e2, first)} "
        f"Seeds {seeds}: the shards, the base model and the store are made once; each seed trains its own TEC "
        "students and control (initialisation, masks, data order), so arms are compared seed by seed. "
        "Accuracies are top-1 (%) on the test split, frozen encoders (exported timm weights), best of CLS and "
        "mean pooling, linear probe by L-BFGS (not MAE's protocol). Wall times are this machine's.", "",
        *results_table(r), "",
        "Paired differences over seeds (mean with its Student-t 95 % interval):", "",
        *differences_table(r), "",
        f"Target store: {store_line}.", "", _cost_line(r), "",
        "## What it shows", "", *claims(r), "",
        f"![loss curves]({loss_png})", "", f"![accuracy]({acc_png})", "",
        "## Commands", "", "```sh", commands, "```", "",
        f"## Configuration (seed {first})", "", *_configs(root, first),
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", path)
    return path
