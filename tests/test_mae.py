"""Plain MAE: shapes, masking, timm-compatible encoder, learning, and what its checkpoints record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cli
from tec_pipeline.models.base import load_encoder
from tec_pipeline.models.mae import (
    MAEConfig,
    MaskedAutoencoder,
    checkpoint_extra,
    encoder_state_dict,
    mae_step,
)
from tec_pipeline.models.vit import build_vit, resolve_arch
from tec_pipeline.train.loop import LoopConfig, run_training
from tests.conftest import needs_fashion_mnist, tensorboard_scalars

ARCH = resolve_arch("tec_pico_p4_16")  # 16 px, patch 4 → L = 16, D = 48, depth 3


def tiny_mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(ARCH, MAEConfig(decoder_depth=1, **kw))


def test_shapes_and_mask_counts():
    model = tiny_mae()
    images = torch.randn(5, 3, 16, 16)
    latent, mask, ids_restore = model.forward_encoder(images)
    assert latent.shape == (5, 1 + 4, 48)  # int(16 · 0.25) = 4 kept patches + CLS
    assert mask.shape == (5, 16) and (mask.sum(dim=1) == 12).all()
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    out = model(images)
    assert out["pred"].shape == (5, 16, 4 * 4 * 3) and out["loss"].ndim == 0
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_injected_noise_selects_the_kept_patches():
    model = tiny_mae()
    noise = torch.rand(2, 16)
    _, mask, _ = model.forward_encoder(torch.randn(2, 3, 16, 16), noise)
    kept = noise.argsort(dim=1)[:, :4]
    expected = torch.ones(2, 16)
    expected.scatter_(1, kept, 0.0)
    assert torch.equal(mask, expected)


def test_encoder_is_a_timm_vit_under_its_key_names():
    model = tiny_mae(mask_ratio=0.0)
    vit = build_vit(ARCH)
    vit.load_state_dict(encoder_state_dict(model.state_dict()), strict=True)
    images = torch.randn(2, 3, 16, 16)
    ordered = torch.arange(16.0).expand(2, -1)  # keep every patch, in order
    latent, _, _ = model.eval().forward_encoder(images, ordered)
    torch.testing.assert_close(latent, vit.eval().forward_features(images), rtol=1e-5, atol=1e-5)


def test_norm_pix_loss_matches_mae_formula():
    model = tiny_mae()
    images, pred = torch.randn(2, 3, 16, 16), torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    target = model.patchify(images)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    per_patch = ((pred - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(-1)
    torch.testing.assert_close(model.forward_loss(images, pred, mask), per_patch[:, :5].mean())
    # patch (0, 1) holds pixels rows 0-3, columns 4-7, in (row, col, channel) order
    assert torch.equal(target[0, 1], images[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def test_loss_decreases_on_a_fixed_batch():
    model = tiny_mae()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16, generator=g).cumsum(dim=3)  # some spatial structure to predict
    noise = torch.rand(8, 16, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(40):
        loss = model(images, noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_training_checkpoint_records_arch_and_kind(tmp_path):
    model = tiny_mae()

    def batches(epoch, start):
        for i in range(start, 2):
            yield {"images": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(epoch * 10 + i))}

    cfg = LoopConfig(epochs=1, batch_size=4, blr=1e-3)
    run_training(model, batches, 2, cfg, tmp_path, checkpoint_extra(ARCH, model.config), step_fn=mae_step)
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ck["kind"] == "mae" and ck["arch"] == ARCH.to_dict()
    assert ck["mae"]["decoder_depth"] == 1 and ck["mae"]["decoder_embed_dim"] == ARCH.decoder_embed_dim
    build_vit(ARCH).load_state_dict(encoder_state_dict(ck["model"]), strict=True)


@pytest.fixture(scope="module")
def fmnist_500(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tec_pipeline.data.writing import write_shards

    root = tmp_path_factory.mktemp("fmnist500")
    write_shards("fashion-mnist", root / "train", "train", shard_size=256, limit=500, seed=0, progress=False)
    write_shards("fashion-mnist", root / "test", "test", shard_size=256, limit=300, seed=0, progress=False)
    return root / "train", root / "test"


def linprobe_top1(checkpoint: Path, shards: tuple[Path, Path], out: Path) -> float:
    cli.main(["linprobe", "--checkpoint", str(checkpoint), "--train-shards", str(shards[0]),
              "--test-shards", str(shards[1]), "--json", str(out)])
    return json.loads(out.read_text())["top1"]


@needs_fashion_mnist
def test_mae_pretrain_command_beats_a_random_encoder(fmnist_500, tmp_path):
    run = tmp_path / "run"
    cli.main(["mae-pretrain", "--shards", str(fmnist_500[0]), "--out", str(run), "--model", ARCH.name,
              "--epochs", "12", "--batch-size", "50", "--blr", "5e-3", "--warmup-epochs", "1",
              "--decoder-depth", "2"])
    ck = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ck["kind"] == "mae" and ck["arch"]["name"] == ARCH.name and ck["schedule"]["step"] == 120
    _, info = load_encoder(run / "checkpoint.pth")  # what cache-targets does: no --base-arch needed
    assert info.arch == ARCH and info.fmt == "mae"
    random_ckpt = tmp_path / "random.pth"
    torch.manual_seed(0)
    torch.save({"model": build_vit(ARCH).state_dict(), "arch": ARCH.to_dict(), "kind": "mae"}, random_ckpt)
    trained = linprobe_top1(run / "checkpoint.pth", fmnist_500, tmp_path / "trained.json")
    untrained = linprobe_top1(random_ckpt, fmnist_500, tmp_path / "random.json")
    assert trained > untrained + 5, (trained, untrained)  # measured: 59.0 vs 46.7 (300 test images)


@needs_fashion_mnist
def test_mae_pretrain_resumes_to_the_same_weights(fmnist_shards, tmp_path, monkeypatch):
    import tec_pipeline.train.mae_pretrain as stage

    args = ["mae-pretrain", "--shards", str(fmnist_shards), "--model", ARCH.name, "--epochs", "2",
            "--batch-size", "32", "--limit", "128", "--warmup-epochs", "0.5", "--decoder-depth", "1",
            "--save-every", "1", "--deterministic"]
    cli.main([*args, "--out", str(tmp_path / "full")])
    calls = {"n": 0}

    def dying_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 1, second batch: resume from the mid-epoch checkpoint after step 5
            raise KeyboardInterrupt
        return mae_step(model, batch)

    monkeypatch.setattr(stage, "mae_step", dying_step)
    with pytest.raises(SystemExit):
        cli.main([*args, "--out", str(tmp_path / "part")])
    monkeypatch.undo()
    assert torch.load(tmp_path / "part" / "checkpoint.pth", weights_only=True)["data_position"]["batch"] == 1
    cli.main([*args, "--out", str(tmp_path / "part")])
    full = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "part" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # TensorBoard holds the same per-step losses as metrics.csv
    csv_loss = [float(r.split(",")[3]) for r in (tmp_path / "full" / "metrics.csv").read_text().splitlines()[1:]]
    scalars = tensorboard_scalars(tmp_path / "full")
    assert scalars["train/loss"] == pytest.approx(csv_loss, rel=1e-6) and "train/lr" in scalars
