"""The numbers of a `make study` run (study.mk): codecs, stored views, masks per view, student sizes, cost.

Reads what `make study` leaves in its directory S:
  S/evals/<run>-{linprobe,knn}.json   frozen-encoder accuracy of each student run
  S/timing/<step>.{ms,cpu}            wall milliseconds and CPU seconds of each step (repro/timed.py):
                                      cache-<codec>, <run> (training), eval-<run>
  S/store-<codec>.zarr                the target stores (bytes per view); store-fp16 holds 8 views
  S/<run>/config.yaml                 each run's configuration
Run names: codec-<codec>-s<seed>, online-s0, views-v<V>-s0, masks-m<M>-s0, size-<arch>-s0. `codec-fp16-s<seed>`
is also the V = 2, M = 1, micro-size arm of seed s (study.mk says why), so each question changes one thing
against it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tec_pipeline.repro.results import METHODS, step_seconds, store_summary, top1
from tec_pipeline.repro.stats import paired_difference, summarize

CODECS = ("fp32", "fp16", "int8", "ecq")
REFERENCE_CODEC = "fp32"
DEFAULT_ARM = "codec-fp16-s0"  # V = 2, M = 1, the base model's size
# the default codec is the smallest whose linear-probe accuracy is at most this many points below fp32's
CODEC_MARGIN = 0.3


def cpu_seconds(root: Path, step: str) -> float | None:
    return step_seconds(root, [step], "cpu")


def _runs(root: Path, pattern: str) -> dict[str, re.Match[str]]:
    found = ((p.name.removesuffix("-knn.json"), p) for p in (root / "evals").glob("*-knn.json"))
    return {name: m for name, _ in found if (m := re.fullmatch(pattern, name))}


def store_bytes_per_view(root: Path, codec: str) -> dict[str, Any] | None:
    return store_summary(root / f"store-{codec}.zarr")


def _seeded(root: Path, prefix: str) -> dict[int, dict[str, float | None]]:
    runs = _runs(root, re.escape(prefix) + r"-s(\d+)")
    return {int(m.group(1)): {method: top1(root, name, method) for method in METHODS} for name, m in runs.items()}


def _summary(per_seed: dict[int, dict[str, float | None]], method: str) -> dict[str, Any] | None:
    values = [v[method] for v in per_seed.values() if v[method] is not None]
    if not values:
        return None
    s = summarize(values)
    return {"mean": s.mean, "std": s.std, "n": s.n, "text": str(s)}


def _delta(a: dict[int, dict[str, float | None]], b: dict[int, dict[str, float | None]], method: str
           ) -> dict[str, Any] | None:
    seeds = sorted(s for s in a.keys() & b.keys() if a[s][method] is not None and b[s][method] is not None)
    if not seeds:
        return None
    d = paired_difference([a[s][method] for s in seeds], [b[s][method] for s in seeds])
    return {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n, "text": str(d)}


def codec_results(root: Path) -> dict[str, Any]:
    reference = _seeded(root, f"codec-{REFERENCE_CODEC}")
    out = {}
    for codec in CODECS:
        per_seed = _seeded(root, f"codec-{codec}")
        out[codec] = {"top1": per_seed, "store": store_bytes_per_view(root, codec),
                      **{f"{m}_summary": _summary(per_seed, m) for m in METHODS},
                      **{f"{m}_delta": _delta(per_seed, reference, m) if codec != REFERENCE_CODEC else None
                         for m in METHODS}}
    return out


def choose_codec(codecs: dict[str, Any]) -> dict[str, Any]:
    """The smallest codec (bytes per view) whose mean linear-probe delta against fp32 is >= -CODEC_MARGIN."""
    qualified = []
    for codec, r in codecs.items():
        delta = r["linprobe_delta"] if codec != REFERENCE_CODEC else {"mean": 0.0}
        if r["store"] is not None and delta is not None and delta["mean"] >= -CODEC_MARGIN:
            qualified.append((r["store"]["per_view"], codec))
    if not qualified:
        return {"codec": None, "qualified": [], "rule": f"mean linear-probe delta >= -{CODEC_MARGIN} vs fp32"}
    return {"codec": min(qualified)[1], "qualified": [c for _, c in sorted(qualified)],
            "rule": f"mean linear-probe delta >= -{CODEC_MARGIN} vs fp32"}


def _single(root: Path, run: str) -> dict[str, Any]:
    return {"run": run, **{m: top1(root, run, m) for m in METHODS}, "train_cpu_s": cpu_seconds(root, run),
            "eval_cpu_s": cpu_seconds(root, f"eval-{run}")}


def question_results(root: Path) -> dict[str, Any]:
    """The single-seed questions: stored views against online, masks per view, student sizes."""
    views = {2: _single(root, DEFAULT_ARM)}
    views.update({int(m.group(1)): _single(root, name) for name, m in _runs(root, r"views-v(\d+)-s0").items()})
    masks = {1: _single(root, DEFAULT_ARM)}
    masks.update({int(m.group(1)): _single(root, name) for name, m in _runs(root, r"masks-m(\d+)-s0").items()})
    sizes = {"tec_micro_p4_28": _single(root, DEFAULT_ARM)}
    sizes.update({m.group(1): _single(root, name) for name, m in _runs(root, r"size-(.+)-s0").items()})
    for arch, r in sizes.items():
        r["params"] = encoder_params(arch)
    return {"views": dict(sorted(views.items())), "online": _single(root, "online-s0"),
            "masks": dict(sorted(masks.items())), "sizes": dict(sorted(sizes.items(), key=lambda x: x[1]["params"]))}


def encoder_params(arch_name: str) -> int:
    import torch

    from tec_pipeline.models.vit import build_vit, resolve_arch

    with torch.device("meta"):
        return sum(p.numel() for p in build_vit(resolve_arch(arch_name), init=False).parameters())


def cost_results(root: Path, n_train: int, epochs: int) -> dict[str, Any]:
    """Measured base-model forward passes and CPU seconds, the FLOP model checked against them, ImageNet ViT-B."""
    from tec_pipeline.repro.cost import count_step_flops, extrapolate

    steps = sorted(p.stem for p in (root / "timing").glob("*.cpu"))
    per_step = {s: cpu_seconds(root, s) for s in steps}
    cached, online = per_step.get(DEFAULT_ARM), per_step.get("online-s0")
    measured_share = 1 - cached / online if cached and online else None
    fp16 = store_bytes_per_view(root, "fp16")
    small = count_step_flops("tec_micro_p4_28")
    vit_b = count_step_flops("vit_base_patch16_224")
    return {"cpu_seconds": per_step, "n_train": n_train, "epochs": epochs,
            "base_forward_passes": {"online run": epochs * n_train, "cached run": 0,
                                    "fp16 store (8 views, once)": (fp16 or {}).get("views", 8) * n_train,
                                    "2-view store (once)": 2 * n_train},
            "teacher_share": {"measured_cpu": measured_share, "flops_micro": small.teacher_share,
                              "flops_vit_b": vit_b.teacher_share},
            "flops": {"micro": vars(small), "vit_b": vars(vit_b)},
            "imagenet_vit_b": extrapolate(vit_b, epochs=300, views=2)}


def study_results(root: Path, epochs: int) -> dict[str, Any]:
    codecs = codec_results(root)
    reference_store = codecs["fp16"]["store"] or codecs["fp32"]["store"]
    n_train = reference_store["rows"] if reference_store else 0
    return {"epochs": epochs, "n_train": n_train, "codecs": codecs, "default_codec": choose_codec(codecs),
            **question_results(root), "cost": cost_results(root, n_train, epochs)}
