"""Evaluation: kNN and linear probe, layer-decay groups, the JSON record, and bad-input handling of the commands."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from tec_pipeline.data.shards import Sample, index_shards, write_manifest
from tec_pipeline.eval.features import Features
from tec_pipeline.eval.finetune import TrainAugment, _posterize
from tec_pipeline.eval.knn import knn_evaluate
from tec_pipeline.eval.linear import linear_probe
from tec_pipeline.eval.report import REQUIRED_KEYS
from tec_pipeline.models.vit import ViTArch, build_vit, resolve_arch
from tec_pipeline.train.optim import layer_decay_groups
from tests.conftest import assert_one_line_error, needs_fashion_mnist, tec_in_process, tensorboard_scalars

MICRO = resolve_arch("tec_micro_p4_28")  # Fashion-MNIST size


def clustered(n: int, classes: int, dim: int, seed: int, random_labels: bool = False) -> Features:
    """Gaussian clusters (well separated) in `dim` dims; optionally labels unrelated to the clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 4
    labels = torch.arange(n) % classes
    x = centres[labels] + torch.randn(n, dim, generator=g)
    if random_labels:
        labels = torch.randint(0, classes, (n,), generator=g)
    # "mean" pooling carries no information here, so the reported (best) pooling must be "cls"
    return Features(cls=x, mean=torch.randn(n, dim, generator=g), labels=labels)


def _mae_linear_probe(train: Features, test: Features) -> dict:
    return linear_probe(train, test, protocol="mae")


@pytest.mark.parametrize("evaluate", [knn_evaluate, linear_probe, _mae_linear_probe],
                         ids=["knn", "linprobe", "linprobe-mae"])
def test_separable_features_are_classified(evaluate):
    result = evaluate(clustered(600, 10, 16, 0), clustered(200, 10, 16, 1))
    assert result["top1"] > 95 and result["pooling"] == "cls"
    assert result["per_pooling"]["mean"]["top1"] < 25
    assert result["top5"] >= result["top1"]


@pytest.mark.parametrize("evaluate", [knn_evaluate, linear_probe, _mae_linear_probe],
                         ids=["knn", "linprobe", "linprobe-mae"])
def test_random_labels_give_chance_accuracy(evaluate):
    result = evaluate(clustered(600, 10, 16, 0, random_labels=True), clustered(400, 10, 16, 1, random_labels=True))
    assert result["top1"] < 20  # chance is 10 %
    assert 30 < result["top5"] < 70  # chance is 50 %


def test_layer_decay_puts_tokens_in_layer_zero():
    arch = resolve_arch("tec_pico_p4_16")  # depth 3
    model = build_vit(arch, num_classes=10, global_pool="avg")
    names = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for group in layer_decay_groups(model, 0.05, layer_decay=0.5):
        for p in group["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = group["lr_scale"], group["weight_decay"]
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert scale[name] == 0.5 ** (arch.depth + 1), name
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**3 and scale["blocks.2.mlp.fc1.weight"] == 0.5
    assert scale["head.weight"] == 1.0 and scale["fc_norm.weight"] == 1.0
    assert decay["cls_token"] == decay["pos_embed"] == decay["blocks.0.norm1.weight"] == 0.0
    assert decay["patch_embed.proj.weight"] == decay["head.weight"] == 0.05


# ---------------------------------------------------------------- commands on real shards


@pytest.fixture(scope="module")
def fmnist_test_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tec_pipeline.data.writing import write_shards

    out = tmp_path_factory.mktemp("fmnist-test") / "test"
    write_shards("fashion-mnist", out, "test", shard_size=64, limit=100, seed=0, progress=False)
    return out


def random_encoder_checkpoint(directory: Path, arch: ViTArch) -> Path:
    torch.manual_seed(0)
    path = directory / f"{arch.name}.pth"
    torch.save({"model": build_vit(arch).state_dict(), "arch": arch.to_dict(), "kind": "mae"}, path)
    return path


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_encoder_checkpoint(tmp_path_factory.mktemp("ckpt"), MICRO)


def run_cli(args: list[str]) -> int:
    """cli.main's exit status: 0 when it returns, else the SystemExit code."""
    try:
        cli.main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _frozen_args(checkpoint, train, test):
    return ["--checkpoint", str(checkpoint), "--train-shards", str(train), "--test-shards", str(test),
            "--limit-train", "200"]


@needs_fashion_mnist
def test_frozen_evaluation_writes_json_schema(fmnist_shards, fmnist_test_shards, micro_checkpoint, tmp_path):
    """linprobe and knn write the JSON schema; frozen-eval, from one feature extraction, writes the same two
    records, also when it evaluates its --export of the checkpoint (the file `tec convert` writes)."""
    from safetensors import safe_open

    args = _frozen_args(micro_checkpoint, fmnist_shards, fmnist_test_shards)
    for method in ("linprobe", "knn"):
        assert run_cli([method, *args, "--json", str(tmp_path / f"alone-{method}.json")]) == 0
    # frozen-eval as `make reproduce` runs it: export first (as `tec convert` does), then evaluate the export
    assert run_cli(["frozen-eval", *args, "--export", str(tmp_path / "one.safetensors"),
                    "--json-prefix", str(tmp_path / "both")]) == 0
    assert run_cli(["convert", str(micro_checkpoint), "--out", str(tmp_path / "apart.safetensors")]) == 0
    apart, one = (safe_open(tmp_path / f"{n}.safetensors", "pt") for n in ("apart", "one"))
    assert apart.metadata() == one.metadata() and set(apart.keys()) == set(one.keys())
    assert all(torch.equal(apart.get_tensor(k), one.get_tensor(k)) for k in apart.keys())
    for method in ("linprobe", "knn"):
        record = json.loads((tmp_path / f"alone-{method}.json").read_text())
        assert set(REQUIRED_KEYS) <= set(record)
        assert record["method"] == method and record["arch"] == MICRO.name
        assert record["n_train"] == 200 and record["n_test"] == 100 and record["num_classes"] == 10
        assert set(record["per_pooling"]) == {"cls", "mean"}
        assert record["top1"] == max(v["top1"] for v in record["per_pooling"].values())
        assert record["top1"] > 20  # even a random ViT's features beat chance (10 %) on Fashion-MNIST
        if method == "linprobe":  # the JSON says which protocol produced the number
            assert record["protocol"]["name"] == "lbfgs" and "not MAE's protocol" in record["protocol"]["description"]
        both = json.loads((tmp_path / f"both-{method}.json").read_text())
        assert both["per_pooling"] == record["per_pooling"] and both["top1"] == record["top1"]
        assert both["checkpoint"] == str(tmp_path / "one.safetensors")  # what it evaluated: the export


@needs_fashion_mnist
def test_linprobe_mae_protocol_is_recorded(fmnist_shards, fmnist_test_shards, micro_checkpoint, tmp_path):
    out = tmp_path / "mae.json"
    assert run_cli(["linprobe", "--protocol", "mae", "--checkpoint", str(micro_checkpoint), "--train-shards",
                    str(fmnist_shards), "--test-shards", str(fmnist_test_shards), "--json", str(out),
                    "--limit-train", "200"]) == 0
    record = json.loads(out.read_text())
    assert record["protocol"]["name"] == "mae" and record["per_pooling"]["cls"]["config"]["epochs"] == 90
    assert record["top1"] > 20


def test_lars_rescales_matrices_by_the_trust_ratio_and_leaves_biases():
    from tec_pipeline.eval.linear_mae import LARS

    w = torch.nn.Parameter(torch.full((2, 2), 3.0))  # |w| = 6
    b = torch.nn.Parameter(torch.zeros(2))
    w.grad, b.grad = torch.full((2, 2), 0.5), torch.ones(2)  # |g_w| = 1
    LARS([w, b], lr=1.0, momentum=0.9, trust_coefficient=0.001).step()
    assert torch.allclose(w, torch.full((2, 2), 3.0 - 0.5 * 0.001 * 6.0))  # step = g · 0.001·|w|/|g|
    assert torch.allclose(b, -torch.ones(2))  # 1-D: plain momentum SGD


def unlabelled_shards(root: Path) -> Path:
    root.mkdir()
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(np.full((28, 28), 30 * i, np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"img{i:03d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    write_manifest(root, index_shards(root))
    return root


@needs_fashion_mnist
def test_bad_inputs_exit_2_with_one_line(fmnist_shards, micro_checkpoint, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    unlabelled = unlabelled_shards(tmp_path / "unlabelled")
    base = ["--train-shards", str(fmnist_shards), "--test-shards", str(fmnist_shards), "--limit-train", "20",
            "--limit-test", "20"]
    cases = {
        "not a checkpoint": ["knn", "--checkpoint", str(junk), *base],
        "input size": ["knn", "--checkpoint", str(micro_checkpoint), "--arch", "tec_pico_p4_16", *base],
        "no label": ["linprobe", "--checkpoint", str(micro_checkpoint), "--train-shards", str(unlabelled),
                     "--test-shards", str(fmnist_shards)],
    }
    for expected, args in cases.items():
        assert run_cli(args) == 2, expected
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


@needs_fashion_mnist
def test_finetune_trains_the_encoder_and_writes_json(fmnist_shards, fmnist_test_shards, tmp_path):
    pico = resolve_arch("tec_pico_p4_16")
    checkpoint = random_encoder_checkpoint(tmp_path, pico)
    out = tmp_path / "ft.json"
    args = ["finetune", "--checkpoint", str(checkpoint), "--train-shards", str(fmnist_shards),
            "--test-shards", str(fmnist_test_shards), "--json", str(out), "--out", str(tmp_path / "run"),
            "--epochs", "2", "--batch-size", "32", "--limit-train", "128", "--limit-test", "64", "--blr", "1e-2",
            "--warmup-epochs", "1", "--mixup", "0.8", "--cutmix", "1.0"]
    assert run_cli(args) == 0
    record = json.loads(out.read_text())
    assert record["method"] == "finetune" and record["n_test"] == 64 and record["n_train"] == 128
    ck = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    base = torch.load(checkpoint, weights_only=True)["model"]
    assert ck["kind"] == "finetune" and ck["model"]["head.weight"].shape == (10, pico.embed_dim)
    assert not torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    assert not torch.equal(ck["model"]["pos_embed"], base["pos_embed"])  # layer 0 trains too (tiny lr, not 0)
    scalars = tensorboard_scalars(tmp_path / "run")
    assert len(scalars["train/loss"]) == ck["schedule"]["step"] and "train/data_wait" in scalars, sorted(scalars)


def test_training_augmentation_is_keyed_by_seed_epoch_row():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    sample = Sample(row=7, key="k", image=image, label=3)
    first = TrainAugment(28, seed=0, epoch=2, aa="rand-m9-mstd0.5-inc1", reprob=0.25)(sample)
    torch.rand(5)  # global RNG use in between must not matter
    again = TrainAugment(28, seed=0, epoch=2, aa="rand-m9-mstd0.5-inc1", reprob=0.25)(sample)
    other = TrainAugment(28, seed=0, epoch=3, aa="rand-m9-mstd0.5-inc1", reprob=0.25)(sample)
    assert torch.equal(first["images"], again["images"]) and first["labels"] == 3
    assert not torch.equal(first["images"], other["images"])


def test_posterize_to_zero_bits_gives_black_instead_of_raising():
    image = Image.new("RGB", (4, 4), (200, 100, 50))
    assert np.asarray(_posterize(image, 0)).max() == 0
    assert np.asarray(_posterize(image, 1)).tolist()[0][0] == [128, 0, 0]


@needs_fashion_mnist
def test_frozen_eval_bad_export_is_one_line(fmnist_shards, fmnist_test_shards, micro_checkpoint, tmp_path, capfd):
    """--export refuses what `tec convert --out` refuses (here a non-safetensors name), in one line, before any
    evaluation, and writes nothing."""
    args = _frozen_args(micro_checkpoint, fmnist_shards, fmnist_test_shards)
    proc = tec_in_process(capfd, "frozen-eval", *args, "--export", str(tmp_path / "enc.pth"),
                          "--json-prefix", str(tmp_path / "both"))
    assert_one_line_error(proc)
    assert "--export" in proc.stderr and not list(tmp_path.iterdir())
