"""`make ablate-views`: how much do fresh views per epoch matter? Cached students trained from the first V
views of one store (V in 1, 2, 4, 8) against the online student (a fresh view every epoch), all for the same
number of student epochs; frozen-encoder accuracy of each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tec_pipeline.config import require


def _top1(path: Path) -> float | None:
    return json.loads(path.read_text())["top1"] if path.is_file() else None


def ablation_results(root: Path) -> dict[str, Any]:
    arms = sorted((p.name for p in (root / "evals").glob("*-linprobe.json")), key=lambda n: (n.startswith("online"), n))
    out = {}
    for name in arms:
        arm = name.removesuffix("-linprobe.json")
        out[arm] = {"linprobe_top1": _top1(root / "evals" / f"{arm}-linprobe.json"),
                    "knn_top1": _top1(root / "evals" / f"{arm}-knn.json")}
    return out


def write_ablation_report(root: str | Path, epochs: int) -> Path:
    """R/report.md with the table and R/views.png (top-1 against V, online as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    results = ablation_results(root)
    require(bool(results), f"{root}/evals holds no results; run `make ablate-views` first")
    (root / "results.json").write_text(json.dumps(results, indent=1))
    cached = {int(a.removeprefix("cached-v")): r for a, r in results.items() if a.startswith("cached-v")}
    online = results.get("online")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("linprobe", "o-"), ("knn", "s-")):
        views = sorted(cached)
        ax.plot(views, [cached[v][f"{method}_top1"] for v in views], style, label=f"cached, {method}")
        if online and online[f"{method}_top1"] is not None:
            ax.axhline(online[f"{method}_top1"], ls="--", lw=1, color=ax.lines[-1].get_color(),
                       label=f"online (fresh view each epoch), {method}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="stored views V", ylabel="top-1 (%)", title=f"{epochs} student epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "views.png", dpi=110)
    plt.close(fig)
    lines = ["# How much do fresh views matter?", "",
             f"TEC students trained for {epochs} epochs from the first V views of one cache (view = epoch mod V), "
             "against the online student, which sees a fresh view every epoch. Frozen-encoder top-1 (%) on the "
             "Fashion-MNIST test split.", "",
             "| student | views seen | linear probe | kNN |", "|---|---|---|---|"]
    for v in sorted(cached):
        lines.append(f"| cached, V = {v} | {v} | {cached[v]['linprobe_top1']:.2f} | {cached[v]['knn_top1']:.2f} |")
    if online:
        lines.append(f"| online | {epochs} | {online['linprobe_top1']:.2f} | {online['knn_top1']:.2f} |")
    lines += ["", "![top-1 against V](views.png)", "",
              "With V >= the number of epochs a cached student sees exactly the online student's views and targets; "
              "below that it revisits views."]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
