"""`tec verify`: is a store complete, made from these shards, and does it hold what the base model computes?

The recompute check replays the stored box of random valid rows, runs the base model again (fp32, here) and
compares with the stored targets within the codec's own error bound plus an allowance that follows the
precision the store records (float noise of another batch split or device for fp32; the autocast's rounding
for bf16/fp16); top-k indices must agree except where the recomputed ranking has near-ties (a swapped pair
whose head-mean CLS logits differ by less than the attention allowance).

The base model is found by content: `--base-model` (or the recorded path, a hint) must have the recorded
sha256, so a moved checkpoint is fine and another one is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tec_pipeline.data.shards import Manifest, iter_samples, load_manifest
from tec_pipeline.data.views import ViewBox, normalize, recorded_replay, replay_view_uint8
from tec_pipeline.errors import UserError
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.models.vit import ViTArch
from tec_pipeline.store.integrity import check_integrity
from tec_pipeline.store.target_store import TargetStore

# absolute + relative, per recorded autocast: fp32 float noise of another batch split, thread count or device;
# bf16 keeps 8 mantissa bits (2^-8 per rounding, grown over the blocks), fp16 11
NUMERIC_ALLOWANCE = {"none": 1e-3, "fp16": 2e-2, "bf16": 1e-1}


def _invalid_rows(store: TargetStore, limit: int = 20) -> list[str]:
    try:
        valid = store.valid_mask()
        done = np.repeat(store.done_mask(), store.spec.chunk_rows, axis=1)[:, : store.spec.rows]
    except Exception:  # noqa: BLE001 — a damaged valid/done chunk: the integrity reasons already name it
        return []
    views, rows = np.nonzero(done & ~valid)
    return [f"view {v} row {r}" for v, r in zip(views[:limit].tolist(), rows[:limit].tolist(), strict=True)]


def _within(stored: np.ndarray, recomputed: np.ndarray, bound: np.ndarray, allowance: float) -> float:
    """Largest excess of |stored - recomputed| over its bound (<= 0 means within)."""
    return float(np.max(np.abs(stored - recomputed) - bound - allowance * (1 + np.abs(recomputed))))


def topk_agrees(stored: np.ndarray, cls_scores: np.ndarray, allowance: float) -> bool:
    """Whether stored top-k indices [k] are a valid top-k of the recomputed head-mean CLS logits [L] up to
    near-ties: every stored index scores within `allowance` (abs + rel) of the recomputed k-th best, and no
    index left out scores more than `allowance` above the lowest stored one."""
    k = len(stored)
    kth = np.sort(cls_scores)[::-1][k - 1]
    slack = allowance * (1 + abs(kth))
    chosen = cls_scores[stored]
    outside = np.delete(cls_scores, stored)
    return len(set(stored.tolist())) == k and bool(chosen.min() >= kth - slack) and (
        not outside.size or bool(outside.max() <= chosen.min() + slack))


def load_base_model(attrs: dict[str, Any], base_model: str | None, base_arch: str | None) -> torch.nn.Module:
    """The store's base model from `base_model` or the recorded path (a hint), checked by its recorded sha256."""
    path = base_model or attrs["base_model"]["source"]
    if "://" not in path and not path.startswith("random:") and not Path(path).is_file():
        raise UserError(f"the store's base model {path} is not there (the recorded path is only a hint); pass "
                        "--base-model CHECKPOINT")
    # the recorded architecture (at the recorded input size) rebuilds exactly the model that made the store
    recorded = base_arch or ViTArch.from_dict(attrs["base_model"]["arch"])
    model, ckpt = load_encoder(path, recorded, input_size=attrs["base_model"]["input_size"])
    sha = attrs["base_model"]["sha256"]
    if ckpt.sha256 != sha:
        raise UserError(f"{path} is not the store's base model (its sha256 {ckpt.sha256[:12]} differs from the "
                        f"recorded {sha[:12]}); pass --base-model with the checkpoint the store was made from")
    return model


def _images_by_row(shards: str, manifest: Manifest, rows: list[int]) -> dict[int, Any]:
    images = {}
    for row in sorted(rows):
        sample = next(iter(iter_samples(shards, row, row + 1, manifest)))
        images[row] = sample.image
    return images


def recompute_check(store: TargetStore, shards: str, manifest: Manifest, count: int, seed: int = 0,
                    base_arch: str | None = None, base_model: str | None = None, progress: bool = False) -> list[str]:
    """Reasons why `count` random valid rows do not match a fresh computation (empty: they match)."""
    attrs, spec = store.attrs, store.spec
    precision = attrs["targets"].get("precision")
    allowance = NUMERIC_ALLOWANCE[precision["autocast"] if isinstance(precision, dict) else "none"]
    model = load_base_model(attrs, base_model, base_arch)
    rng = np.random.default_rng(seed)
    picks = [(int(rng.integers(spec.views)), int(rng.integers(spec.rows))) for _ in range(count)]
    images = _images_by_row(shards, manifest, [r for _, r in picks])
    codec, size, reasons = store.codec, attrs["base_model"]["input_size"], []
    replay = recorded_replay(attrs["views"])  # the pixels stage 1 computed on, or one line why not here
    for view, row in tqdm(picks, desc="rows recomputed", unit="row", disable=not progress, dynamic_ncols=True,
                          leave=False):
        stored = store.read_rows(view, row, row + 1)
        if not stored["valid"][0] or images[row] is None:
            continue
        box = ViewBox.from_array(stored["boxes"][0])
        x = normalize(replay_view_uint8(images[row], box, size, replay)).unsqueeze(0)
        with torch.no_grad():
            fresh = {k: v.numpy() for k, v in stored_targets(model, x, spec.k, attrs["targets"]["last_layers"]).items()}
        for name, part in (("features", codec.features), ("attention", codec.attention)):
            excess = _within(stored[name], fresh[name], part.tolerance(part.encode(fresh[name])), allowance)
            if excess > 0:
                reasons.append(f"view {view} row {row}: stored {name} differ from a recomputation by {excess:.3g} "
                               "beyond the codec's bound")
        cls_scores = fresh["attention"][0, 0].mean(axis=0)  # head-mean CLS→patch logits [L]: the ranking
        if not topk_agrees(stored["topk_index"][0], cls_scores, allowance):
            reasons.append(f"view {view} row {row}: stored top-k indices differ from a recomputation beyond "
                           "near-ties")
    return reasons


def verify_store(url: str, shards: str, recompute: int = 0, seed: int = 0, base_arch: str | None = None,
                 base_model: str | None = None, progress: bool = False) -> dict[str, Any]:
    """{'ok': bool, 'reasons': [...], 'invalid_rows': [...], 'repairable': bool} for `tec verify`;
    `progress`: bars over the chunk checks and the recomputed rows."""
    store = TargetStore.open(url)
    manifest = load_manifest(shards)
    reasons = check_integrity(store, progress=progress)
    data = store.attrs["data"]
    if data["fingerprint"] != manifest.fingerprint:
        reasons.append(f"the store was made from other shards (fingerprint {data['fingerprint'][:12]}, "
                       f"{shards} has {manifest.fingerprint[:12]})")
    elif store.spec.rows > manifest.total_rows:
        reasons.append(f"the store has {store.spec.rows} rows, the shards only {manifest.total_rows}")
    elif recompute and not reasons:
        reasons += recompute_check(store, shards, manifest, recompute, seed, base_arch, base_model, progress)
    # chunk or flag damage of finished tasks is what `cache-targets --repair` recomputes (integrity.damaged_tasks)
    repairable = any(" chunk of " in r or r.startswith("done flag of ") for r in reasons)
    return {"ok": not reasons, "reasons": reasons, "invalid_rows": _invalid_rows(store), "repairable": repairable}
