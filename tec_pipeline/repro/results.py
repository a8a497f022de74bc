"""The numbers of a `make reproduce` run: per-arm accuracies over seeds, paired differences, costs, claims.

Reads what `make reproduce` leaves in its run directory R:
  R/evals/<arm>-{linprobe,knn}.json        the unseeded arms (random, base)
  R/evals/<arm>-s<seed>-{linprobe,knn}.json the seeded arms (tec-cached, tec-online, mae-control), one per seed
  R/timing/<step>.{ms,cpu}                  wall ms and CPU seconds of each step (seeded: <arm>-s<seed>)
  R/targets.zarr                            the target store (size, bytes per view)

The shards, the MAE base model and the target store are made once; the seed changes each student's (and each
control's) initialisation, masks and data order. Seed s of every seeded arm shares everything else, so the arms
are compared by paired differences over seeds (repro/stats.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_pipeline.data.shards import load_manifest
from tec_pipeline.repro.stats import paired_difference, summarize

METHODS = ("linprobe", "knn")
# an interval inside ±EQUIVALENCE_MARGIN points counts as "as good as" (the margin the codec choice uses too)
EQUIVALENCE_MARGIN = 0.3


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    seeded: bool
    timing: tuple[str, ...]  # timing files that make up the arm's own cost (seeded: per seed)


ARMS = (
    Arm("random", "random-init encoder (floor)", False, ()),
    Arm("base", "MAE base, E1 epochs", False, ("base",)),
    Arm("tec-cached", "TEC from the cache, E2 epochs", True, ("tec-cached",)),
    Arm("tec-online", "TEC online, E2 epochs", True, ("tec-online",)),
    Arm("mae-control", "MAE base + E2 more MAE epochs", True, ("mae-control",)),
)
ARM_NAMES = {arm.name: arm for arm in ARMS}
# (name, a, b): what each paired difference a - b answers
COMPARISONS = (
    ("TEC − control", "tec-cached", "mae-control"),
    ("TEC − base", "tec-cached", "base"),
    ("cached − online", "tec-cached", "tec-online"),
)


def discover_seeds(root: Path) -> list[int]:
    """The seeds of the seeded arms, from R/evals/tec-cached-s<seed>-linprobe.json."""
    found = (re.fullmatch(r"tec-cached-s(\d+)-linprobe\.json", p.name) for p in (root / "evals").glob("*.json"))
    return sorted(int(m.group(1)) for m in found if m)


def run_names(arm: Arm, seeds: list[int]) -> list[str]:
    """Run / eval names of an arm: `base`, or `tec-cached-s0`, `tec-cached-s1`, ..."""
    return [f"{arm.name}-s{s}" for s in seeds] if arm.seeded else [arm.name]


def top1(root: Path, run: str, method: str) -> float | None:
    """Top-1 of R/evals/<run>-<method>.json, None when that evaluation has not run."""
    path = root / "evals" / f"{run}-{method}.json"
    return json.loads(path.read_text())["top1"] if path.is_file() else None


def step_seconds(root: Path, steps: list[str], kind: str = "wall") -> float | None:
    """Wall (timing/<step>.ms) or CPU (timing/<step>.cpu) seconds of `steps` together; None if any is missing."""
    files = [root / "timing" / f"{n}.{'ms' if kind == 'wall' else 'cpu'}" for n in steps]
    if not files or not all(f.is_file() for f in files):
        return None
    total = sum(float(f.read_text().strip()) for f in files)
    return total / 1000 if kind == "wall" else total


def store_summary(path: Path) -> dict[str, Any] | None:
    """Size of the target store at `path` (None when there is none): stored and raw fp16 bytes per view."""
    from tec_pipeline.store.integrity import describe
    from tec_pipeline.store.target_store import TargetStore

    if not (path / "zarr.json").is_file():
        return None
    d = describe(TargetStore.open(str(path)))
    spec = d["spec"]
    fp16 = spec["patches"] * spec["dim"] * 2 + (1 + spec["k"]) * spec["heads"] * spec["patches"] * 2
    return {"stored_bytes": d["stored_bytes"], "per_view": d["stored_bytes_per_image_view"], "raw_fp16_per_view": fp16,
            "codec": d["codec"], "views": d["views"], "rows": d["rows"], "image_views": d["rows_done"]}


def _arm_result(root: Path, arm: Arm, seeds: list[int], label: str, forward_passes: int) -> dict[str, Any]:
    runs = run_names(arm, seeds)
    out: dict[str, Any] = {"label": label, "runs": runs, "base_forward_passes": forward_passes}
    for method in METHODS:
        values = [top1(root, run, method) for run in runs]
        out[f"{method}_top1"] = values  # per seed (one value for unseeded arms), None where missing
        present = [v for v in values if v is not None]
        s = summarize(present) if present else None
        out[f"{method}_mean"], out[f"{method}_std"] = (s.mean, s.std) if s else (None, None)
    out["seeds_done"] = len([v for v in out["linprobe_top1"] if v is not None])
    for kind in ("wall", "cpu"):
        per_run = [step_seconds(root, [f"{t}-s{s}" if arm.seeded else t for t in arm.timing], kind)
                   for s in (seeds or [0])]
        known = [t for t in per_run if t is not None]
        key = "seconds_per_seed" if kind == "wall" else "cpu_seconds_per_seed"
        out[key] = sum(known) / len(known) if known and arm.timing else None
    return out


def _differences(arms: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, a, b in COMPARISONS:
        out[name] = {}
        for method in METHODS:
            left, right = arms[a][f"{method}_top1"], arms[b][f"{method}_top1"]
            if len(right) == 1:  # an unseeded reference: the same value for every seed
                right = right * len(left)
            pairs = [(x, y) for x, y in zip(left, right, strict=True) if x is not None and y is not None]
            if not pairs:
                out[name][method] = None
                continue
            d = paired_difference([x for x, _ in pairs], [y for _, y in pairs])
            out[name][method] = {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n, "text": str(d)}
    return out


def results(root: Path, views: int, e1: int, e2: int) -> dict[str, Any]:
    """Everything the report states, as numbers (also written as results.json)."""
    seeds = discover_seeds(root)
    n_train = load_manifest(root / "shards" / "train").total_rows
    forward_passes = {"random": 0, "base": 0, "tec-cached": 0, "tec-online": e2 * n_train, "mae-control": 0}
    arms = {}
    for arm in ARMS:
        label = arm.label.replace("E1", str(e1)).replace("E2", str(e2))
        arms[arm.name] = _arm_result(root, arm, seeds, label, forward_passes[arm.name])
    cache_seconds, cache_cpu = step_seconds(root, ["cache"]), step_seconds(root, ["cache"], "cpu")
    return {"n_train": n_train, "views": views, "e1": e1, "e2": e2, "seeds": seeds, "arms": arms,
            "differences": _differences(arms, seeds), "store": store_summary(root / "targets.zarr"),
            "cache": {"base_forward_passes": views * n_train, "seconds": cache_seconds, "cpu_seconds": cache_cpu}}


def _verdict_better(d: dict[str, Any] | None) -> str:
    if d is None or d["low"] is None:
        return "cannot be judged (fewer than 2 seeds)"
    if d["low"] > 0:
        return f"supported: {d['text']} points, the 95 % interval excludes 0"
    if d["high"] < 0:
        return f"contradicted: {d['text']} points, the 95 % interval lies below 0"
    return f"not shown at this scale: {d['text']} points, the 95 % interval includes 0"


def _verdict_equal(d: dict[str, Any] | None) -> str:
    if d is None or d["low"] is None:
        return "cannot be judged (fewer than 2 seeds)"
    m = EQUIVALENCE_MARGIN
    if -m <= d["low"] and d["high"] <= m:
        return f"supported: {d['text']} points, the 95 % interval lies within ±{m}"
    if d["low"] > m or d["high"] < -m:
        return f"contradicted: {d['text']} points, the 95 % interval lies outside ±{m}"
    if d["low"] > 0 or d["high"] < 0:
        return (f"not shown: {d['text']} points; the 95 % interval excludes 0 (a difference is established) but "
                f"reaches inside ±{m}, so it may still be small")
    return (f"not shown at this scale: {d['text']} points; the 95 % interval is wider than ±{m}, so neither "
            "equality nor a difference is established")


def claims(r: dict[str, Any]) -> list[str]:
    """The three claims a user picks this tool for, each judged by the paired intervals."""
    diffs, lines = r["differences"], []
    control, equal = diffs["TEC − control"], diffs["cached − online"]
    for method in METHODS:
        lines.append(f"- **TEC beats continuing the base model** ({method}, TEC − control): "
                     f"{_verdict_better(control[method])}.")
    for method in METHODS:
        lines.append(f"- **The cache is as good as online** ({method}, cached − online): "
                     f"{_verdict_equal(equal[method])}.")
    lines.append("- **One cache serves many students**: not measured by `make reproduce` (one student size); "
                 "`make study` trains three student sizes from one cache (docs/study).")
    return lines
