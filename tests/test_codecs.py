"""Target codecs: round-trip errors within each codec's documented bound, saturation, measured sizes."""

import warnings

import numpy as np
import pytest

from tec_pipeline.bench.codecs import measure_codec
from tec_pipeline.errors import UserError
from tec_pipeline.store.codecs import CODECS, ECQ_FEATURE_STEP, get_codec, quantize

# documented max |decoded − input| per element (codecs.py table), as functions of the input
# fp16: 2^-11 relative; int8: scale/2, scale = max|x| over D / 127 per (row, patch); ecq: step/2 (normalised)
FEATURE_BOUND = {
    "fp32": lambda x: np.zeros_like(x),
    "fp16": lambda x: np.abs(x) * 2.0**-11 + 2.0**-25,
    # the scale is max|x|/127 rounded up to float16: relative 2^-10 above, one subnormal spacing (2^-24) below 2^-14
    "int8": lambda x: (np.abs(x).max(-1, keepdims=True) / 127 * (1 + 2.0**-9) + 2.0**-24) / 2,
    "ecq": lambda x: np.maximum(ECQ_FEATURE_STEP, np.abs(x).max(-1, keepdims=True) / 127) / 2 * (1 + 2.0**-9),
}
# attention: fp32 exact, fp16 for fp16 and int8, ecq (max − min)/255 / 2 per (row, query, head)
ATTENTION_BOUND = {
    "fp32": FEATURE_BOUND["fp32"],
    "fp16": FEATURE_BOUND["fp16"],
    "int8": FEATURE_BOUND["fp16"],
    "ecq": lambda a: (a.max(-1, keepdims=True) - a.min(-1, keepdims=True) + 2.0**-10 * np.abs(a).max(-1, keepdims=True))
    / 510 * (1 + 2.0**-9) + 1e-6,  # + one float16 spacing of the row offset
}


def _features(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[3, 6, 64] float32: N(0,1) rows, rows with one large outlier per patch, all-zero rows, or tiny values."""
    x = rng.standard_normal((3, 6, 64), dtype=np.float32)
    if kind == "far":  # scales below float16's smallest normal
        x *= 1e-6
    elif kind == "outlier":
        x[:, :, 5] = 60.0 * np.sign(rng.standard_normal((3, 6))).astype(np.float32)
    elif kind == "zero":
        x[1] = 0.0
    return x


def _attention(kind: str, rng: np.random.Generator) -> np.ndarray:
    """[3, 4, 2, 6] float32 logits, same kinds; "far": rows far from 0 with a range below float16's spacing."""
    a = 3.0 * rng.standard_normal((3, 4, 2, 6), dtype=np.float32) - 5.0
    if kind == "far":
        a = -1000.2 + 0.1 * rng.random((3, 4, 2, 6), dtype=np.float32)  # nearest float16 of the min is above it
    elif kind == "outlier":
        a[:, :, :, 0] = 40.0
    elif kind == "zero":
        a[1] = 0.0
    return a


@pytest.mark.parametrize("kind", ["normal", "outlier", "zero", "far"])
@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_within_documented_bound(name: str, kind: str) -> None:
    codec, rng = get_codec(name), np.random.default_rng(0)
    x, a = _features(kind, rng), _attention(kind, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero row must not divide by zero
        fx, fa = codec.features.encode(x), codec.attention.encode(a)
        x_hat, a_hat = codec.features.decode(fx), codec.attention.decode(fa)
    assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
    assert a_hat.dtype == np.float32 and a_hat.shape == a.shape
    assert np.all(np.abs(x_hat - x) <= FEATURE_BOUND[name](x))
    assert np.all(np.abs(a_hat - a) <= ATTENTION_BOUND[name](a))
    # the codec's own stated bound (what readers of a store can compute) holds too
    assert np.all(np.abs(x_hat - x) <= codec.features.tolerance(fx))
    assert np.all(np.abs(a_hat - a) <= codec.attention.tolerance(fa))
    if kind == "zero":
        assert np.all(x_hat[1] == 0) and np.all(a_hat[1] == 0)


def test_ecq_error_is_step_limited_on_normalised_features() -> None:
    """ecq's promise: max error 0.175 and RMS ≈ step/√12 on unit-variance features."""
    x = np.random.default_rng(1).standard_normal((4, 49, 256), dtype=np.float32)
    codec = get_codec("ecq")
    err = codec.features.decode(codec.features.encode(x)) - x
    assert np.abs(err).max() <= ECQ_FEATURE_STEP / 2 * (1 + 2.0**-9)
    assert abs(np.sqrt(np.mean(err**2)) - ECQ_FEATURE_STEP / np.sqrt(12)) < 0.005


def test_quantize_saturates_instead_of_wrapping() -> None:
    x = np.array([[300.0, -300.0, 126.6, -127.4, 0.4]], dtype=np.float32)
    q = quantize(x, np.ones((1, 1), np.float32), -127, 127, np.int8)
    assert q.tolist() == [[127, -127, 127, -127, 0]]
    u = quantize(np.array([[-3.0, 300.0]], np.float32), np.ones((1, 1), np.float32), 0, 255, np.uint8)
    assert u.tolist() == [[0, 255]]


def test_int8_extremes_keep_their_sign() -> None:
    x = np.zeros((1, 2, 8), dtype=np.float32)
    x[0, 0, :2] = [1000.0, -1000.0]
    x[0, 1, :2] = [1e-2, -1e-2]  # small scale: rounded up to float16, so the extremes still map to ±127
    enc = get_codec("int8").features.encode(x)
    assert enc["features"].dtype == np.int8 and enc["feature_scale"].dtype == np.float16
    assert enc["features"][0, 0, :2].tolist() == [127, -127]
    assert enc["features"][0, 1, :2].tolist() == [127, -127]
    assert np.allclose(get_codec("int8").features.decode(enc)[0, :, :2], x[0, :, :2], rtol=2e-3)


def test_non_finite_and_fp16_overflow_are_refused() -> None:
    x = np.zeros((1, 2, 4), np.float32)
    x[0, 0, 0] = np.nan
    for name in CODECS:
        with pytest.raises(ValueError, match="non-finite"):
            get_codec(name).features.encode(x)
    with pytest.raises(ValueError, match="float16"):
        get_codec("fp16").attention.encode(np.full((1, 1, 1, 2), 7e4, np.float32))


def test_unknown_codec_is_a_user_error() -> None:
    with pytest.raises(UserError, match="fp16"):
        get_codec("int3")


def _vit_b_view(rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """ViT-B/16, k=15: normalised features [rows, 196, 768], logits [rows, 16, 12, 196]."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((rows, 196, 768), dtype=np.float32)
    attention = 2.0 * rng.standard_normal((rows, 16, 12, 196), dtype=np.float32)
    return features, attention


def test_ecq_stores_under_030_of_fp16_on_vit_b_shapes() -> None:
    features, attention = _vit_b_view()
    ecq = measure_codec("ecq", features, attention, repeats=1)
    assert ecq["ratio_to_fp16"] <= 0.30
    assert ecq["bytes_per_view"] == pytest.approx(ecq["ratio_to_fp16"] * (301_056 + 75_264))
    assert ecq["max_abs_err"] <= ECQ_FEATURE_STEP / 2 * (1 + 2.0**-9)


def test_measured_bytes_are_the_written_chunks() -> None:
    """Raw codecs measure their exact size (+ one 4-byte CRC per chunk); compressible data measures smaller."""
    features, attention = _vit_b_view()
    crc = 2 * 4 / 2  # two chunks, two rows
    assert measure_codec("fp16", features, attention, repeats=1)["bytes_per_view"] == 376_320 + crc
    assert measure_codec("fp32", features, attention, repeats=1)["bytes_per_view"] == 752_640 + crc
    noisy = measure_codec("ecq", features, attention, repeats=1)["bytes_per_view"]
    flat = measure_codec("ecq", np.zeros_like(features), np.zeros_like(attention), repeats=1)["bytes_per_view"]
    assert flat < noisy / 20


@pytest.mark.parametrize("where", [0, (1 << 15) - 1, 1 << 15, 3 * (1 << 15) + 7, -1])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_float16_inputs_checked_in_every_block(where: int, bad: float) -> None:
    """Stage 1 hands float16 (cast on the device) to the fp16 codec: a non-finite value anywhere, in any block
    of the blocked bit check, is refused; the largest finite float16 values are not."""
    x = np.full((2, 7, 4 * (1 << 13) + 3), 65504.0, np.float16)
    x[0, 0, :3] = [-65504.0, 6e-8, 0.0]
    get_codec("fp16").features.encode(x)
    x.reshape(-1)[where] = bad
    with pytest.raises(ValueError, match="non-finite"):
        get_codec("fp16").features.encode(x)
