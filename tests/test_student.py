"""TEC student (spec §3, §13): sizes, timm compatibility, masking, the attention head, gradients, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from tec_pipeline.models.losses import attention_loss, feature_loss
from tec_pipeline.models.masking import random_masking, restore_sequence
from tec_pipeline.models.student import FeatureAdaptor, TECStudent
from tec_pipeline.models.vit import build_vit, fold_mlp_cls_token, resolve_arch, sincos_pos_embed_2d

PICO = resolve_arch("tec_pico_p4_16")  # 16 px, patch 4 -> L=16, D=48, depth 3, 2 heads, decoder 32
L, D, H = PICO.num_patches, PICO.embed_dim, PICO.num_heads
STORE_K = 7  # targets hold more top-k rows than the student's k=5 uses


def _student(**kwargs: object) -> TECStudent:
    torch.manual_seed(0)
    return TECStudent(PICO, **{"k": 5, **kwargs})


def _batch(batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=gen, dtype=dtype)
    targets = {
        "features": torch.randn(batch, L, D, generator=gen, dtype=dtype),
        "attention": torch.randn(batch, 1 + STORE_K, H, L, generator=gen, dtype=dtype),
        "topk_index": torch.stack([torch.randperm(L, generator=gen)[:STORE_K] for _ in range(batch)]).short(),
    }
    return x, targets


def _noise(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, L, generator=torch.Generator().manual_seed(seed))


def _trainable_count(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes))


def test_vit_base_parameter_counts_match_spec() -> None:
    with torch.device("meta"):  # counts only: no memory, no init cost
        model = TECStudent(resolve_arch("vit_base_patch16_224"), k=15)
    assert round(_trainable_count(model, ("encoder_adaptor.",)) / 1e6, 2) == 19.70
    assert round(_trainable_count(model, ("cls_token_mlp.",)) / 1e6, 2) == 4.72
    decoders = ("forward_fea_decoder.", "forward_att_decoder.", "decoder_blocks.")
    assert round(_trainable_count(model, decoders) / 1e6, 2) == 8.28


def test_encoder_is_timm_vit_after_folding_the_cls_mlp() -> None:
    model = _student(mask_ratio=0.0).eval()
    vit = build_vit(PICO).eval()
    extras = ("cls_token_mlp.", "encoder_adaptor.", "decoder_", "forward_fea_decoder.", "forward_att_decoder.")
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(extras)}
    assert set(encoder) == set(vit.state_dict())
    folded = fold_mlp_cls_token({**encoder, **{k: v for k, v in model.state_dict().items()
                                                if k.startswith("cls_token_mlp.")}})
    vit.load_state_dict(folded, strict=True)
    x, _ = _batch()
    ascending = torch.arange(L, dtype=torch.float32).expand(2, L)  # keep every patch, in patch order
    with torch.no_grad():
        collected, _, _ = model.forward_encoder(x, ascending)
        expected = vit.forward_features(x)
    assert len(collected) == PICO.depth
    torch.testing.assert_close(collected[-1], expected, rtol=1e-5, atol=1e-5)


def test_layer_choices_follow_spec_13() -> None:
    model = _student()
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)
    assert not any(isinstance(m, DropPath) for m in model.modules())
    adaptor_norms = {"encoder_adaptor.adap_before", "encoder_adaptor.adap_after"}
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert m.eps == (1e-5 if name in adaptor_norms else 1e-6), name


def test_initialisation_is_mae() -> None:
    model = _student()
    torch.testing.assert_close(model.pos_embed.data, sincos_pos_embed_2d(D, PICO.grid_size))
    torch.testing.assert_close(model.decoder_pos_embed.data, sincos_pos_embed_2d(32, PICO.grid_size))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0, name
            bound = math.sqrt(6 / (m.in_features + m.out_features))  # xavier-uniform range
            assert m.weight.abs().max() <= bound, name
    bias = model.patch_embed.proj.bias  # Conv2d default: U(±1/sqrt(fan_in)), not zero (spec §13.2)
    assert torch.count_nonzero(bias) == bias.numel() and bias.abs().max() <= 1 / math.sqrt(3 * 4 * 4)
    for token in (model.cls_token, model.forward_fea_decoder.mask_token, model.forward_att_decoder.mask_token):
        assert 0.005 < token.std() < 0.05


def test_encoder_adaptor_matches_spec_formula() -> None:
    torch.manual_seed(0)
    dim, depth = 8, 6
    adaptor = FeatureAdaptor(dim, depth, num_adap=2, mid_dim=16).double()
    for p in adaptor.parameters():  # move norms and biases off their (1, 0) init so they matter
        nn.init.normal_(p, std=0.5)
    layers = [torch.randn(2, 5, dim, dtype=torch.float64) for _ in range(depth)]
    full = torch.cat(layers, dim=-1)  # one LayerNorm over all depth·D channels, eps 1e-5
    normed = (full - full.mean(-1, keepdim=True)) / (full.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    normed = normed * adaptor.adap_before.weight + adaptor.adap_before.bias
    total = 0
    for i in range(2):  # chunk i = layers 3i, 3i+1, 3i+2
        chunk = normed[..., 3 * i * dim:3 * (i + 1) * dim]
        y = chunk @ adaptor.fuse_fcs[i].weight.T + adaptor.fuse_fcs[i].bias
        mlp = adaptor.adap_mlps[i]
        hidden = torch.nn.functional.gelu(y @ mlp.fc1.weight.T + mlp.fc1.bias)
        total = total + (hidden @ mlp.fc2.weight.T + mlp.fc2.bias) + y
    expected = torch.nn.functional.layer_norm(total, (dim,), adaptor.adap_after.weight, adaptor.adap_after.bias, 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(adaptor(layers), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.7, 0.0])
def test_mask_removes_the_spec_count(ratio: float) -> None:
    kept, mask, _ = random_masking(torch.randn(3, L, 4), ratio, _noise(3))
    assert kept.shape == (3, int(L * (1 - ratio)), 4)
    assert mask.sum(dim=1).tolist() == [L - int(L * (1 - ratio))] * 3


def test_unshuffling_restores_patch_order() -> None:
    noise = _noise(3)
    values = torch.arange(L, dtype=torch.float32).expand(3, L).unsqueeze(-1)  # token i carries value i
    kept, mask, ids_restore = random_masking(values, 0.75, noise)
    # kept tokens are those with the smallest noise, removed positions are exactly mask == 1
    assert torch.equal(kept[..., 0].long(), noise.argsort(dim=1)[:, : kept.shape[1]])
    with_cls = torch.cat([torch.full((3, 1, 1), -2.0), kept], dim=1)
    restored = restore_sequence(with_cls, torch.full((1, 1, 1), -1.0), ids_restore)
    assert torch.equal(restored[:, 0, 0], torch.full((3,), -2.0))
    expected = torch.where(mask.bool(), torch.tensor(-1.0), torch.arange(L, dtype=torch.float32))
    assert torch.equal(restored[:, 1:, 0], expected)


def test_forward_shapes_and_losses_come_from_the_loss_functions() -> None:
    model = _student()
    x, targets = _batch()
    preds = model.predict(x, targets["topk_index"][:, :5], _noise())
    assert preds["pred_fea"].shape == (2, L, D) and preds["pred_att"].shape == (2, 6, H, L)
    out = model(x, targets, _noise())
    assert out["weights"] == {"fea": 1.0, "att": 1.0}
    assert torch.equal(out["loss_fea"], feature_loss(preds["pred_fea"], targets["features"], preds["mask"]))
    att = attention_loss(preds["pred_att"], targets["attention"][:, :6], 1.8)
    assert torch.equal(out["loss_att"], att)
    assert torch.equal(out["loss"], out["loss_fea"] + out["loss_att"])


def test_forward_is_deterministic_given_noise() -> None:
    model = _student()
    x, targets = _batch()
    first, second = model(x, targets, _noise()), model(x, targets, _noise())
    other = model(x, targets, _noise(seed=9))
    for key in ("loss_fea", "loss_att"):
        assert torch.equal(first[key], second[key])
        assert not torch.equal(first[key], other[key])  # the noise really chooses the mask


def test_stored_topk_beyond_k_is_cut_and_too_few_rows_refused() -> None:
    model = _student()
    x, targets = _batch()
    cut = {"features": targets["features"], "attention": targets["attention"][:, :6],
           "topk_index": targets["topk_index"][:, :5]}
    assert torch.equal(model(x, targets, _noise())["loss"], model(x, cut, _noise())["loss"])
    short = {**cut, "topk_index": cut["topk_index"][:, :4], "attention": cut["attention"][:, :5]}
    with pytest.raises(ValueError, match="k=5"):
        model(x, short, _noise())


def test_every_trainable_parameter_gets_a_finite_gradient() -> None:
    model = _student()
    x, targets = _batch()
    model(x, targets, _noise())["loss"].backward()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_without_pred_att_only_the_feature_loss_trains() -> None:
    model = _student(pred_att=False)
    assert not any(n.startswith("forward_att_decoder.") for n, _ in model.named_parameters())
    x, targets = _batch()
    out = model(x, {"features": targets["features"]}, _noise())
    assert "loss_att" not in out and out["weights"] == {"fea": 1.0}
    assert torch.equal(out["loss"], out["loss_fea"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_permuting_topk_permutes_attention_rows() -> None:
    model = _student()
    x, targets = _batch()
    topk = targets["topk_index"][:, :5]
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        base = model.predict(x, topk, _noise())["pred_att"]
        permuted = model.predict(x, topk[:, perm], _noise())["pred_att"]
    torch.testing.assert_close(permuted[:, 0], base[:, 0], rtol=0, atol=0)  # CLS row stays first
    torch.testing.assert_close(permuted[:, 1:], base[:, 1 + perm], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(permuted[:, 1:], base[:, 1:])


def test_attention_head_matches_an_explicit_computation() -> None:
    model = _student().double()
    x, targets = _batch(dtype=torch.float64)
    topk = targets["topk_index"][:, :5].long()
    head = model.forward_att_decoder
    captured = {}
    head.decoder_norm.register_forward_hook(lambda _m, _i, out: captured.setdefault("z", out))
    with torch.no_grad():
        pred = model.predict(x, topk, _noise())["pred_att"]
        qk = captured["z"] @ head.decoder_qk.weight.T + head.decoder_qk.bias  # [B, 1+L, 2D] = [q | k]
    hd = D // H
    for b in range(2):
        for r, token in enumerate([0, *(1 + topk[b]).tolist()]):
            for h in range(H):
                q = qk[b, token, h * hd:(h + 1) * hd]
                for key in range(L):
                    k = qk[b, 1 + key, D + h * hd:D + (h + 1) * hd]
                    expected = float(q @ k) / math.sqrt(D)  # pred_dim^-0.5, CLS key skipped
                    assert abs(pred[b, r, h, key].item() - expected) < 1e-10


def test_masks_per_view_is_the_mean_of_single_mask_losses() -> None:
    model = _student()
    x, targets = _batch()
    noise = _noise(4)
    both = model(x, targets, noise, masks_per_view=2)
    first, second = model(x, targets, noise[:2]), model(x, targets, noise[2:])
    assert both["mask"].shape == (4, L)
    for key in ("loss_fea", "loss_att", "loss"):
        torch.testing.assert_close(both[key], (first[key] + second[key]) / 2, rtol=1e-6, atol=1e-6)


def test_losses_are_fp32_under_bf16_autocast() -> None:
    model = _student()
    x, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, targets, _noise())
    assert out["loss_fea"].dtype == out["loss_att"].dtype == torch.float32
    assert torch.isfinite(out["loss"])


def test_gradcheck_float64() -> None:
    model = _student().double()
    x, targets = _batch(batch=1, dtype=torch.float64)
    names = ["cls_token", "forward_fea_decoder.mask_token", "forward_att_decoder.mask_token",
             "encoder_adaptor.adap_after.weight", "forward_att_decoder.decoder_qk.bias"]
    params = dict(model.named_parameters())
    noise = _noise(1)

    def loss(image: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        overrides = dict(zip(names, values, strict=True))
        return torch.func.functional_call(model, overrides, (image, targets, noise))["loss"]

    inputs = (x.requires_grad_(), *(params[n].detach().clone().requires_grad_() for n in names))
    # fast mode compares random projections of the analytic and numerical Jacobians (one direction per input),
    # which keeps a whole-model check within a few seconds
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize(("base_dim", "base_heads"), [(96, 3), (24, 1)])
def test_cross_size_student_predicts_at_the_base_width_and_heads(base_dim: int, base_heads: int) -> None:
    """Spec §3.6b: a student of width 48 (2 heads) learns from a base of another width D and head count H."""
    student = _student(pred_dim=base_dim, pred_heads=base_heads)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    targets = {"features": torch.randn(2, L, base_dim, generator=gen),
               "attention": torch.randn(2, 1 + STORE_K, base_heads, L, generator=gen),
               "topk_index": torch.stack([torch.randperm(L, generator=gen)[:STORE_K] for _ in range(2)])}
    preds = student.predict(x, targets["topk_index"][:, :5], _noise())
    assert preds["pred_fea"].shape == (2, L, base_dim) and preds["pred_att"].shape == (2, 6, base_heads, L)
    assert student.forward_att_decoder.scale == base_dim**-0.5  # pred_dim^-0.5 with pred_dim = base D
    assert student.blocks[0].attn.qkv.weight.shape == (3 * D, D)  # the encoder keeps the student's width
    out = student(x, targets, noise=_noise())
    out["loss"].backward()
    assert math.isfinite(float(out["loss"].detach())) and student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_equal_width_student_is_exactly_the_reference_model() -> None:
    default, explicit = _student(), _student(pred_dim=D, pred_heads=H, decoder_depth=PICO.decoder_depth)
    assert default.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in default.state_dict().items())
    x, targets = _batch()
    assert torch.equal(default(x, targets, noise=_noise())["loss"], explicit(x, targets, noise=_noise())["loss"])


def test_decoder_shape_comes_from_the_architecture() -> None:
    import dataclasses

    arch = dataclasses.replace(PICO, decoder_depth=3, decoder_embed_dim=40, decoder_num_heads=5, decoder_mlp_ratio=2.0)
    torch.manual_seed(0)
    student = TECStudent(arch, k=5)
    assert len(student.decoder_blocks) == 3 and student.decoder_blocks[0].mlp.fc1.out_features == 80
    assert student.decoder_blocks[0].attn.num_heads == 5 and student.decoder_pos_embed.shape == (1, 1 + L, 40)
