"""Stage 1's device encoders (stage1/quantize.py) give the numpy encoders' arrays bit for bit, refuse what they
refuse, and a store whose targets were quantised on the device equals one quantised on the host."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tec_pipeline.data.shards import load_manifest
from tec_pipeline.models.base import load_encoder
from tec_pipeline.stage1.compute import compute_task
from tec_pipeline.stage1.decode import decode_task
from tec_pipeline.stage1.quantize import device_encode, encodes_on_device
from tec_pipeline.store.codecs import FP16_MAX, AffineUint8Codec, get_codec
from tec_pipeline.store.layout import StoreSpec, Task
from tec_pipeline.store.target_store import TargetStore
from tests.conftest import assert_one_line_error, needs_fashion_mnist, tec_in_process


def _hard_values(rng: np.random.Generator) -> np.ndarray:
    """float32 [12, 5, 64]: Gaussian rows at many scales, all-zero and constant rows, subnormal-scale rows,
    values at quantisation ties (k + 0.5 steps) and near float16's limit."""
    x = rng.standard_normal((12, 5, 64)).astype(np.float32) * np.float32(3)
    x[0] *= np.float32(1e-6)  # scales below float16's normal range
    x[1] = 0
    x[2] = np.float32(7.25)  # a constant row
    x[3] *= np.float32(3e3)
    x[4, :, :8] = np.float32(60000.0)
    x[5] = (np.arange(64, dtype=np.float32) - 32) * np.float32(0.5)  # ties for a scale of 1
    x[6] = np.float32(-FP16_MAX)
    x[7, 0, 0] = np.float32(FP16_MAX)
    return x


@pytest.mark.parametrize(("codec", "part"), [("int8", "features"), ("ecq", "features"), ("ecq", "attention")])
def test_device_encoder_equals_numpy_encoder(codec: str, part: str) -> None:
    """Every quantised part (int8's attention is float16, a cast)."""
    tensor_codec = getattr(get_codec(codec), part)
    assert encodes_on_device(tensor_codec)
    rng = np.random.default_rng(0)
    for trial in range(4):
        x = _hard_values(rng) if trial == 0 else rng.standard_normal((16, 3, 196)).astype(np.float32) * (trial * 2)
        want = tensor_codec.encode(x)
        got, refused = device_encode(tensor_codec, torch.from_numpy(x))
        assert not refused
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name].numpy(), value, err_msg=f"{codec} {part} {name}")
            assert got[name].numpy().dtype == value.dtype


@pytest.mark.parametrize("codec", ["int8", "ecq"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 70000.0, -70000.0])
def test_device_encoder_refuses_what_numpy_refuses(codec: str, bad: float) -> None:
    for part in (get_codec(codec).features, get_codec(codec).attention):
        if not encodes_on_device(part):
            continue
        x = np.random.default_rng(1).standard_normal((4, 2, 32)).astype(np.float32)
        x[2, 1, 5] = bad
        try:
            part.encode(x)
            numpy_refused = False
        except ValueError:
            numpy_refused = True
        # NaN and inf always; ±70000 only where a float16 holds the value itself (ecq attention's offset),
        # not an int8 scale (70000/127)
        assert numpy_refused == (not np.isfinite(bad) or isinstance(part, AffineUint8Codec))
        assert bool(device_encode(part, torch.from_numpy(x))[1]) == numpy_refused


@needs_fashion_mnist
@pytest.mark.parametrize("codec", ["int8", "ecq"])
def test_store_quantised_on_device_equals_host_quantised(codec: str, fmnist_shards: Path, pico_base: Path,
                                                        tmp_path: Path) -> None:
    """compute_task's targets in stored form (quantised on the device) and the same targets as float32 encoded
    by write_task on the host give the same stored arrays, invalid rows included; a malformed encoding is
    refused."""
    model, ckpt = load_encoder(str(pico_base))
    arch, n = ckpt.arch, 48
    inputs = decode_task(str(fmnist_shards), load_manifest(fmnist_shards), Task(0, 0, 0, n), 0, arch.img_size)
    valid = inputs.valid.copy()
    valid[[3, 17, 40]] = False  # as if those images had not decoded
    inputs = dataclasses.replace(inputs, valid=valid)
    spec = StoreSpec(views=1, rows=n, patches=arch.num_patches, dim=arch.embed_dim, heads=arch.num_heads, k=4,
                     chunk_rows=n, codec=codec)
    stores = {}
    for where in ("device", "host"):
        store = TargetStore.create_or_resume(tmp_path / f"{where}.zarr", spec, {"test": where})
        result = compute_task(model, inputs, 4, 1, 16, torch.device("cpu"), codec=store.codec if where == "device"
                              else None)
        assert isinstance(result["features"], dict) == (where == "device")
        store.write_task(Task(0, 0, 0, n), **result)
        stores[where] = store
    for name in spec.row_arrays:
        np.testing.assert_array_equal(stores["device"].array(name)[:], stores["host"].array(name)[:], err_msg=name)

    encoded = compute_task(model, inputs, 4, 1, 16, torch.device("cpu"), codec=stores["device"].codec)
    scale = next(k for k in encoded["features"] if k != "features")
    bad = {**encoded, "features": {**encoded["features"], scale: encoded["features"][scale].astype(np.float32)}}
    with pytest.raises(ValueError, match="expected float16"):
        stores["device"].write_task(Task(0, 0, 0, n), **bad)
    garbage = encoded["features"]["features"].copy()
    garbage[3] = 1
    with pytest.raises(ValueError, match="invalid rows must be encoded zeros"):
        stores["device"].write_task(Task(0, 0, 0, n), **{**encoded, "features": {**encoded["features"],
                                                                               "features": garbage}})


@needs_fashion_mnist
def test_quantize_on_device_or_host_gives_the_same_store(fmnist_shards: Path, pico_base: Path,
                                                         tmp_path: Path) -> None:
    """`--quantize-on device` and `host` (the CPU's auto) write the same ecq store, byte for byte."""
    from tec_pipeline.stage1 import CacheConfig, cache_targets

    def files(url: Path) -> dict[str, bytes]:
        return {str(p.relative_to(url)): p.read_bytes() for p in sorted(url.rglob("*")) if p.is_file()}

    for where in ("device", "host"):
        cache_targets(CacheConfig(shards=str(fmnist_shards), base_model=str(pico_base), out=str(tmp_path / where),
                                  views=2, topk=4, chunk_rows=48, batch_size=16, codec="ecq", loader_workers=0,
                                  limit=96, quantize_on=where))
    device, host = files(tmp_path / "device"), files(tmp_path / "host")
    assert len(device) > 10 and device == host


@needs_fashion_mnist
def test_bad_quantize_on_is_one_line(fmnist_shards: Path, pico_base: Path, tmp_path: Path,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.zarr"
    proc = tec_in_process(capfd, "cache-targets", "--shards", str(fmnist_shards), "--base-model", str(pico_base),
                          "--out", str(out), "--quantize-on", "gpu")
    assert_one_line_error(proc)
    assert "--quantize-on" in proc.stderr and not out.exists()
