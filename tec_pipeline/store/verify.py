"""`tec verify`: is a store complete, made from these shards, and does it hold what the base model computes?

The recompute check replays the stored box of random valid rows, runs the base model again and compares with
the stored targets within the codec's own error bound (plus a small allowance for float noise between batch
compositions or devices); top-k indices must agree except where the recomputed ranking has near-ties.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tec_pipeline.data.shards import Manifest, iter_samples, load_manifest
from tec_pipeline.data.views import ViewBox, normalize, replay_view_uint8
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.targets import stored_targets
from tec_pipeline.store.layout import TargetStore

NUMERIC_ALLOWANCE = 1e-3  # absolute + relative: float noise of another batch split, thread count or device


def _invalid_rows(store: TargetStore, limit: int = 20) -> list[str]:
    try:
        valid = store.valid_mask()
        done = np.repeat(store.done_mask(), store.spec.chunk_rows, axis=1)[:, : store.spec.rows]
    except Exception:  # noqa: BLE001 — a damaged valid/done chunk: the integrity reasons already name it
        return []
    views, rows = np.nonzero(done & ~valid)
    return [f"view {v} row {r}" for v, r in zip(views[:limit].tolist(), rows[:limit].tolist(), strict=True)]


def _within(stored: np.ndarray, recomputed: np.ndarray, bound: np.ndarray) -> float:
    """Largest excess of |stored - recomputed| over its bound (<= 0 means within)."""
    allowance = NUMERIC_ALLOWANCE * (1 + np.abs(recomputed))
    return float(np.max(np.abs(stored - recomputed) - bound - allowance))


def _images_by_row(shards: str, manifest: Manifest, rows: list[int]) -> dict[int, Any]:
    images = {}
    for row in sorted(rows):
        sample = next(iter(iter_samples(shards, row, row + 1, manifest)))
        images[row] = sample.image
    return images


def recompute_check(store: TargetStore, shards: str, manifest: Manifest, count: int, seed: int = 0,
                    base_arch: str | None = None) -> list[str]:
    """Reasons why `count` random valid rows do not match a fresh computation (empty: they match)."""
    attrs, spec = store.attrs, store.spec
    model, _ = load_encoder(attrs["base_model"]["source"], base_arch or attrs["base_model"]["arch"]["name"])
    rng = np.random.default_rng(seed)
    picks = [(int(rng.integers(spec.views)), int(rng.integers(spec.rows))) for _ in range(count)]
    images = _images_by_row(shards, manifest, [r for _, r in picks])
    codec, size, reasons = store.codec, attrs["base_model"]["input_size"], []
    for view, row in picks:
        stored = store.read_rows(view, row, row + 1)
        if not stored["valid"][0] or images[row] is None:
            continue
        box = ViewBox.from_array(stored["boxes"][0])
        x = normalize(replay_view_uint8(images[row], box, size)).unsqueeze(0)
        with torch.no_grad():
            fresh = {k: v.numpy() for k, v in stored_targets(model, x, spec.k, attrs["targets"]["last_layers"]).items()}
        for name, part in (("features", codec.features), ("attention", codec.attention)):
            excess = _within(stored[name], fresh[name], part.tolerance(part.encode(fresh[name])))
            if excess > 0:
                reasons.append(f"view {view} row {row}: stored {name} differ from a recomputation by {excess:.3g} "
                               "beyond the codec's bound")
        if not np.array_equal(stored["topk_index"][0], fresh["topk_index"][0]):
            reasons.append(f"view {view} row {row}: stored top-k indices differ from a recomputation")
    return reasons


def verify_store(url: str, shards: str, recompute: int = 0, seed: int = 0,
                 base_arch: str | None = None) -> dict[str, Any]:
    """{'ok': bool, 'reasons': [...], 'invalid_rows': [...], 'repairable': bool} for `tec verify`."""
    store = TargetStore.open(url)
    manifest = load_manifest(shards)
    reasons = store.check_integrity()
    data = store.attrs["data"]
    if data["fingerprint"] != manifest.fingerprint:
        reasons.append(f"the store was made from other shards (fingerprint {data['fingerprint'][:12]}, "
                       f"{shards} has {manifest.fingerprint[:12]})")
    elif store.spec.rows > manifest.total_rows:
        reasons.append(f"the store has {store.spec.rows} rows, the shards only {manifest.total_rows}")
    elif recompute and not reasons:
        reasons += recompute_check(store, shards, manifest, recompute, seed, base_arch)
    # chunk or flag damage of finished tasks is what `cache-targets --repair` recomputes (integrity.damaged_tasks)
    repairable = any(" chunk of " in r or r.startswith("done flag of ") for r in reasons)
    return {"ok": not reasons, "reasons": reasons, "invalid_rows": _invalid_rows(store), "repairable": repairable}
