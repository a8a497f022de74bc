"""The two TEC losses against the spec's formulas (§3.7), written out here independently of the implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tec_pipeline.models.losses import attention_loss, feature_loss, normalize_feature_target


def _feature_loss_reference(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, eps: float = 1e-6) -> float:
    """Spec §3.7 with explicit loops: per image/channel normalisation over patches (unbiased), masked mean."""
    batch, length, dim = pred.shape
    num, den = 0.0, 0.0
    for b in range(batch):
        for p in range(length):
            sq = 0.0
            for c in range(dim):
                column = [target[b, i, c] for i in range(length)]
                mean = sum(column) / length
                var = sum((v - mean) ** 2 for v in column) / (length - 1)
                t_hat = (target[b, p, c] - mean) / math.sqrt(var + eps)
                sq += (pred[b, p, c] - t_hat) ** 2
            num += sq / dim * mask[b, p]
            den += mask[b, p]
    return num / den


def _attention_loss_reference(pred: np.ndarray, target: np.ndarray, tau: float) -> float:
    """Spec §3.7 with explicit loops: mean over rows of -Σ softmax(target/tau) · log_softmax(pred)."""
    batch, rows, heads, keys = pred.shape
    total = 0.0
    for b in range(batch):
        for r in range(rows):
            for h in range(heads):
                t_exp = [math.exp(target[b, r, h, j] / tau) for j in range(keys)]
                p_log_norm = math.log(sum(math.exp(pred[b, r, h, j]) for j in range(keys)))
                total += -sum(t_exp[j] / sum(t_exp) * (pred[b, r, h, j] - p_log_norm) for j in range(keys))
    return total / (batch * rows * heads)


def test_feature_loss_matches_spec_formula() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 5, 3)), rng.normal(2.0, 3.0, size=(2, 5, 3))
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=np.float64)
    expected = _feature_loss_reference(pred, target, mask)
    got = feature_loss(torch.from_numpy(pred).float(), torch.from_numpy(target).float(), torch.from_numpy(mask))
    assert got.dtype == torch.float32
    assert abs(got.item() - expected) < 1e-6


def test_feature_loss_counts_only_removed_patches() -> None:
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.float32)
    base = feature_loss(pred, target, mask)
    changed_kept = pred.clone()
    changed_kept[mask == 0] += 10.0
    assert torch.equal(feature_loss(changed_kept, target, mask), base)
    changed_removed = pred.clone()
    changed_removed[0, 0] += 1.0
    assert not torch.allclose(feature_loss(changed_removed, target, mask), base)


def test_attention_loss_matches_spec_formula() -> None:
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(2, 3, 2, 4)), rng.normal(0.0, 2.0, size=(2, 3, 2, 4))
    tau = 1.8
    expected = _attention_loss_reference(pred, target, tau)
    got = attention_loss(torch.from_numpy(pred).float(), torch.from_numpy(target).float(), tau)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected) < 1e-6


def test_renormalising_a_stored_normalised_target_is_harmless() -> None:
    gen = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 16, 8, generator=gen, dtype=torch.float64) * 5 + 3
    once = normalize_feature_target(raw)
    twice = normalize_feature_target(once)
    # a normalised target has mean 0 and unbiased variance v/(v+eps) (v: raw variance), so the second pass
    # only rescales it, by 1/sqrt(v/(v+eps)+eps), which is sqrt(1/(1+eps)) to within 1e-7
    var = raw.var(dim=1, keepdim=True)
    factor = 1 / (var / (var + 1e-6) + 1e-6).sqrt()
    torch.testing.assert_close(twice, once * factor, rtol=1e-12, atol=1e-12)
    assert (factor - math.sqrt(1 / (1 + 1e-6))).abs().max() < 1e-7
    pred = torch.randn(2, 16, 8, generator=gen, dtype=torch.float64)
    mask = (torch.rand(2, 16, generator=gen) < 0.75).double()
    assert abs(feature_loss(pred, raw, mask) - feature_loss(pred, once, mask)).item() < 1e-5


def test_losses_run_in_fp32_under_autocast() -> None:
    gen = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, 6, 4, generator=gen).bfloat16(), torch.randn(2, 6, 4, generator=gen).bfloat16()
    mask = torch.ones(2, 6)
    att_pred, att_target = torch.randn(2, 3, 2, 6, generator=gen).bfloat16(), torch.randn(2, 3, 2, 6).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fea = feature_loss(pred, target, mask)
        att = attention_loss(att_pred, att_target, 1.4)
    assert fea.dtype == att.dtype == torch.float32
    assert torch.equal(fea, feature_loss(pred.float(), target.float(), mask))
    assert torch.equal(att, attention_loss(att_pred.float(), att_target.float(), 1.4))


def test_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="feature_loss"):
        feature_loss(torch.zeros(2, 4, 3), torch.zeros(2, 4, 5), torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_loss"):
        attention_loss(torch.zeros(2, 3, 2, 4), torch.zeros(2, 4, 2, 4), 1.0)
