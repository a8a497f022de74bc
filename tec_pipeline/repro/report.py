"""The reproduction report: results table, loss curves, accuracy chart, and the exact commands and configs.

Reads what `make reproduce` leaves in its run directory R:
  R/evals/<arm>-{linprobe,knn}.json   evaluation results (schema: tec_pipeline/eval/report.py)
  R/<run>/metrics.csv, config.yaml     training curves and resolved configs of each run
  R/timing/<step>.ms                   wall time of each step
  R/targets.zarr                       the target store (size, bytes per view)
  R/commands.sh                        every command, in order
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tec_pipeline.config import require
from tec_pipeline.data.shards import load_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    run: str  # run directory holding metrics.csv
    timing: tuple[str, ...]  # timing files that make up the arm's own cost


ARMS = (
    Arm("random", "random-init encoder (floor)", "", ()),
    Arm("base", "MAE base, E1 epochs", "mae", ("base",)),
    Arm("tec-cached", "TEC from the cache, E2 epochs", "tec-cached", ("cache", "tec-cached")),
    Arm("tec-online", "TEC online, E2 epochs", "tec-online", ("tec-online",)),
    Arm("mae-control", "MAE base + E2 more MAE epochs", "mae-control", ("mae-control",)),
)
METHODS = ("linprobe", "knn")
# what the control arm is (reproduce.mk: `mae-pretrain --init-from base.pth --init-optimizer --epochs E2`)
CONTROL = ("Control: {e2} more MAE epochs started from the base model's final weights and optimizer state, as a "
           "new run with its own schedule ({warmup} warm-up epochs, cosine over {e2} epochs), so it trains as many "
           "epochs as each TEC student; it is not one uninterrupted {e1}+{e2}-epoch MAE schedule.")


def control_sentence(root: Path, e1: int, e2: int) -> str:
    """What the control arm is, with the warm-up its run recorded (config.yaml)."""
    cfg = root / "mae-control" / "config.yaml"
    warmup = yaml.safe_load(cfg.read_text()).get("warmup_epochs", "?") if cfg.is_file() else "?"
    return CONTROL.format(e1=e1, e2=e2, warmup=f"{warmup:g}" if isinstance(warmup, (int, float)) else warmup)


def _seconds(root: Path, names: tuple[str, ...]) -> float | None:
    if not names:
        return None
    files = [root / "timing" / f"{n}.ms" for n in names]
    if not all(f.is_file() for f in files):
        return None
    return sum(int(f.read_text().strip()) for f in files) / 1000


def _metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _eval(root: Path, arm: str, method: str) -> dict[str, Any] | None:
    path = root / "evals" / f"{arm}-{method}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _store_summary(root: Path) -> dict[str, Any] | None:
    from tec_pipeline.store.layout import TargetStore

    if not (root / "targets.zarr" / "zarr.json").is_file():
        return None
    d = TargetStore.open(str(root / "targets.zarr")).describe()
    fp16 = d["spec"]["patches"] * d["spec"]["dim"] * 2 + (1 + d["spec"]["k"]) * d["spec"]["heads"] * d["spec"]["patches"] * 2
    return {"stored_bytes": d["stored_bytes"], "per_view": d["stored_bytes_per_image_view"], "raw_fp16_per_view": fp16,
            "codec": d["codec"], "views": d["views"], "rows": d["rows"], "image_views": d["rows_done"]}


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def results(root: Path, views: int, e1: int, e2: int) -> dict[str, Any]:
    """Everything the report states, as numbers (also written as results.json)."""
    n_train = load_manifest(root / "shards" / "train").total_rows
    forward_passes = {"random": 0, "base": 0, "tec-cached": views * n_train, "tec-online": e2 * n_train,
                      "mae-control": 0}
    arms = {}
    for arm in ARMS:
        evals = {m: _eval(root, arm.name, m) for m in METHODS}
        arms[arm.name] = {
            "label": arm.label.replace("E1+E2", str(e1 + e2)).replace("E1", str(e1)).replace("E2", str(e2)),
            **{f"{m}_top1": (e["top1"] if e else None) for m, e in evals.items()},
            "base_forward_passes": forward_passes[arm.name],
            "seconds": _seconds(root, arm.timing),
        }
    return {"n_train": n_train, "views": views, "e1": e1, "e2": e2, "arms": arms, "store": _store_summary(root)}


def _claims(r: dict[str, Any]) -> list[str]:
    a = r["arms"]
    lines = []
    for m in METHODS:
        key = f"{m}_top1"
        vals = {n: a[n][key] for n in a}
        if None in vals.values():
            continue
        beat_control = vals["tec-cached"] - vals["mae-control"]
        beat_base = vals["tec-cached"] - vals["base"]
        gap = vals["tec-cached"] - vals["tec-online"]
        floor = vals["base"] - vals["random"]
        lines.append(
            f"- **{m}**: the MAE base is {floor:+.2f} points over a random-init encoder; TEC (cached) {'beats' if beat_control > 0 else 'does not beat'} the MAE control by "
            f"{beat_control:+.2f} points and {'surpasses' if beat_base > 0 else 'does not surpass'} its base model by "
            f"{beat_base:+.2f}; cached minus online = {gap:+.2f} points "
            f"({'within' if abs(gap) <= 0.3 else 'outside'} 0.3).")
    return lines


def _plot(root: Path, r: dict[str, Any]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, ax in (("mae", axes[0]), ("mae-control", axes[0]), ("tec-cached", axes[1]), ("tec-online", axes[1])):
        rows = _metrics(root / arm / "metrics.csv")
        if rows:
            ax.plot([x["epoch"] for x in rows], [x["loss"] for x in rows], label=arm, lw=1)
    axes[0].set(title="MAE loss (norm-pix MSE)", xlabel="epoch", ylabel="loss")
    axes[1].set(title="TEC loss (feature + attention)", xlabel="epoch", ylabel="loss")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(root / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(r["arms"])
    width = 0.38
    for i, m in enumerate(METHODS):
        vals = [r["arms"][n][f"{m}_top1"] or 0 for n in names]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(names))], vals, width, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="top-1 (%)", title="Fashion-MNIST test accuracy of frozen encoders")
    lows = [v for n in names for m in METHODS if (v := r["arms"][n][f"{m}_top1"]) is not None]
    if lows:
        ax.set_ylim(max(0, min(lows) - 10), min(100, max(lows) + 5))
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "accuracy.png", dpi=110)
    plt.close(fig)
    return "loss_curves.png", "accuracy.png"


def _configs(root: Path) -> list[str]:
    out = []
    for run in ("mae", "tec-cached", "tec-online", "mae-control"):
        cfg = root / run / "config.yaml"
        if cfg.is_file():
            out += [f"`{run}/config.yaml`", "", "```yaml", cfg.read_text().strip(), "```", ""]
    return out


def results_table(r: dict[str, Any]) -> list[str]:
    lines = ["| arm | linear probe top-1 | kNN top-1 | base-model forward passes | wall time (s) |",
             "|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {a['label']} (`{name}`) | {_fmt(a['linprobe_top1'])} | {_fmt(a['knn_top1'])} | "
                     f"{a['base_forward_passes']:,} | {_fmt(a['seconds'], '.0f')} |")
    return lines


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
    lines = [
        "# TEC reproduction on Fashion-MNIST", "",
        f"{r['n_train']:,} training images; MAE base E1 = {e1} epochs; TEC students E2 = {e2} epochs from "
        f"V = {views} cached views (cached) or fresh views (online). {control_sentence(root, e1, e2)} "
        "Accuracies are top-1 (%) on the test split, frozen encoders (exported timm weights), best of CLS and "
        "mean pooling. Wall times are this machine's.", "",
        *results_table(r), "",
        f"Target store: {store_line}.", "",
        "## What it shows", "", *(_claims(r) or ["- evaluations missing"]), "",
        f"![loss curves]({loss_png})", "", f"![accuracy]({acc_png})", "",
        "## Commands", "", "```sh", commands, "```", "",
        "## Configuration", "", *_configs(root),
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", path)
    return path
