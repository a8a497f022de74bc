"""Target encodings: how features [n, L, D] and attention logits [n, 1+k, H, L] become stored arrays.

A `Codec` pairs one `TensorCodec` for the features with one for the attention. A tensor codec turns a float32
tensor [n, *S] into named arrays [n, ...] (`encode`), back into float32 (`decode`), and states its error bound
per element from the stored arrays alone (`tolerance`). `TargetStore` (layout.py) is the only other code that
touches these arrays; `bench.codecs.measure_codec` is what `tec bench` reports.

| codec | features stored as | attention stored as | compressor | max abs error per element |
|---|---|---|---|---|
| fp32 | float32 | float32 | none | 0 |
| fp16 | float16 | float16 | none | 2^-11·|x| (2^-25 below 2^-14) |
| int8 | int8 + `feature_scale` float16 per (row, patch) = max|x| over D / 127 | float16 (as fp16) | zstd-1 | features scale/2 |
| ecq | int8 + `feature_scale` = max(0.35, max|x| over D / 127) per (row, patch) | uint8 + `attention_scale`, `attention_offset` float16 per (row, query, head): offset = min, scale = (max − min)/255 | zstd-1 | features step/2 = 0.175 on normalised features (RMS 0.10); attention scale/2 = (max − min)/510 of its row |

Scales are rounded *up* and offsets *down* to float16, so every value maps into the integer range; a stored
scale below float16's normal range (2^-14) is coarser than max|x|/127, and the bound is then the stored
scale/2 (`tolerance` reports exactly that). Inputs with NaN/inf, or beyond float16 where float16 is stored,
raise ValueError: stage 1 must not silently store a broken target.

Why ecq: the stored features are normalised per image and channel (unit variance), and the feature loss is an
MSE on them, so one uniform step for every element is the rate–distortion choice (equal distortion everywhere);
zstd's Huffman stage then spends ~3.6 bits per element on Gaussian data — the worst case for unit-variance data,
since the Gaussian has the largest entropy for a given variance. A large outlier costs a few extra bits instead
of coarsening its whole token (as a per-token int4 max-scale would). Attention logits enter the loss through a
softmax, which needs uniform absolute precision per row; 8 bits over the row's range keep it within ~0.2 % of
the range. Every array also carries a CRC32C so `TargetStore.check_integrity` detects corrupted chunks.

Compressors were chosen by measurement (16 ViT-B rows, N(0,1) values, one core): zstd level 1 gives fp16 only
1.09× at ~530 MB/s and would cost a CPU core per 0.5 GB/s in stage 1 and stage 2, so fp16/fp32 are stored raw;
int8 gains 1.09× at ~700 MB/s, kept; for ecq it is the entropy coder (2.2×), and level 1 beats level 3 there
(higher levels find spurious matches in noise-like bytes: 0.45 vs 0.51 of int8 size, 640 vs 110 MB/s).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from tec_pipeline.errors import UserError

FP16_MAX = 65504.0
ECQ_FEATURE_STEP = 0.35  # RMS error 0.35/sqrt(12) ≈ 0.10 on unit-variance features (1 % of their variance)
# float32 slack for the quantised codecs: x·(1/scale) and offset + q·scale are rounded in float32
_SLACK = 2.0**-14


@dataclass(frozen=True)
class ArrayLayout:
    """One stored array: its name, the shape after the (view, row) axes, dtype and compressor ('none'|'zstd')."""

    name: str
    trailing: tuple[int, ...]
    dims: tuple[str, ...]
    dtype: str
    compressor: str = "none"


def zarr_compressors(compressor: str) -> list[zarr.abc.codec.BytesBytesCodec]:
    """Bytes-to-bytes codecs for `compressor`; a CRC32C always comes last so corruption is detected on read."""
    if compressor not in ("none", "zstd"):
        raise ValueError(f"unknown compressor {compressor!r}")
    head = [ZstdCodec(level=1)] if compressor == "zstd" else []
    return [*head, Crc32cCodec()]


def create_array(
    group: zarr.Group, layout: ArrayLayout, leading: tuple[int, int], chunk_rows: int
) -> zarr.Array:
    """Create `layout` in `group` with shape (*leading, *trailing) and chunks (1, chunk_rows, *trailing)."""
    return group.create_array(
        layout.name,
        shape=(*leading, *layout.trailing),
        chunks=(1, chunk_rows, *layout.trailing),
        dtype=layout.dtype,
        filters=None,
        compressors=zarr_compressors(layout.compressor),
        fill_value=False if layout.dtype == "bool" else 0,
        dimension_names=("view", "row", *layout.dims),
    )


def layout_mismatch(arr: zarr.Array, layout: ArrayLayout, leading: tuple[int, int], chunk_rows: int) -> str | None:
    """Why `arr` does not match `layout` (shape, dtype, chunks), or None."""
    shape, chunks = (*leading, *layout.trailing), (1, chunk_rows, *layout.trailing)
    if tuple(arr.shape) != shape or str(arr.dtype) != layout.dtype or tuple(arr.chunks) != chunks:
        return (
            f"array {layout.name} is {arr.dtype}{list(arr.shape)} in chunks {list(arr.chunks)}, "
            f"expected {layout.dtype}{list(shape)} in chunks {list(chunks)}"
        )
    return None


def _require_finite(x: np.ndarray, what: str, limit: float = np.inf) -> None:
    """ValueError unless every value of x is finite and within ±limit.

    min and max propagate NaN, so two reductions check everything without a temporary the size of x.
    Callers may pass per-vector reductions of the data (scales, offsets) instead of the data itself.
    """
    if not x.size:
        return
    if x.dtype == np.float16:
        # numpy reduces float16 in software (2.3 ms per ViT-B row); on the bits it is an integer mask and max:
        # exponent all ones = inf or NaN, also where a cast to float16 overflowed (on the device, in stage 1)
        if _any_fp16_exponent_all_ones(x):
            raise ValueError(f"{what} contains non-finite values (or values beyond ±{FP16_MAX:g} before the cast "
                             "to float16); refusing to store them")
        return
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{what} contains non-finite values; refusing to store them")
    if max(-lo, hi) > limit:
        raise ValueError(f"{what} exceeds ±{limit:g}, which float16 cannot hold")


def _any_fp16_exponent_all_ones(x: np.ndarray, block: int = 1 << 15) -> bool:
    """Whether any float16 of x is inf or NaN, by blocks whose mask stays in cache (0.12 -> 0.07 ms per ViT-B
    row: one pass over memory instead of a write and a read of a temporary the size of x)."""
    bits = np.ascontiguousarray(x).reshape(-1).view(np.uint16)
    scratch = np.empty(min(block, bits.size), dtype=np.uint16)
    for start in range(0, bits.size, block):
        part = bits[start:start + block]
        masked = np.bitwise_and(part, 0x7C00, out=scratch[:part.size])
        if int(masked.max()) == 0x7C00:
            return True
    return False


def fp16_round_up(x: np.ndarray) -> np.ndarray:
    """Smallest float16 ≥ x (float32 in), so a stored scale never clips what it was computed from."""
    h = x.astype(np.float16)
    with np.errstate(over="ignore"):  # the step past ±65504 is computed for every element, kept only where chosen
        return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def fp16_round_down(x: np.ndarray) -> np.ndarray:
    """Largest float16 ≤ x (float32 in)."""
    h = x.astype(np.float16)
    with np.errstate(over="ignore"):
        return np.where(h.astype(np.float32) > x, np.nextafter(h, np.float16(-np.inf)), h)


def quantize(x: np.ndarray, scale: np.ndarray, lo: int, hi: int, dtype: type[np.integer]) -> np.ndarray:
    """round(x / scale) clipped to [lo, hi] in `dtype`; 0 where scale is 0 (all-zero rows).

    x: float32 [..., M]; scale: float [..., 1] (broadcast). Clipping happens before the integer cast, so an
    out-of-range value saturates instead of wrapping (numcodecs' FixedScaleOffset would wrap).
    """
    s = scale.astype(np.float32)
    inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s > 0)
    q = np.multiply(x, inv, dtype=np.float32)  # one pass, in place below: this runs on every stored element
    np.rint(q, out=q)
    np.clip(q, lo, hi, out=q)
    return q.astype(dtype)


class TensorCodec(ABC):
    """Encodes one float tensor [n, *S] as named arrays with leading axis n."""

    name: str

    @abstractmethod
    def layouts(self, trailing: tuple[int, ...], dims: tuple[str, ...]) -> list[ArrayLayout]:
        """Stored arrays for a tensor of shape [n, *trailing]."""

    @abstractmethod
    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x: float32 [n, *S] → arrays named as in `layouts`."""

    @abstractmethod
    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Arrays → float32 [n, *S]."""

    @abstractmethod
    def tolerance(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Bound on |decode − x| per element, from the stored arrays; broadcastable to [n, *S]."""


@dataclass(frozen=True)
class FloatCodec(TensorCodec):
    """Plain float storage (float32 exact; float16 rounds to nearest, relative error 2^-11)."""

    name: str
    dtype: str
    compressor: str = "none"

    def layouts(self, trailing: tuple[int, ...], dims: tuple[str, ...]) -> list[ArrayLayout]:
        return [ArrayLayout(self.name, trailing, dims, self.dtype, self.compressor)]

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        _require_finite(x, self.name, FP16_MAX if self.dtype == "float16" else np.inf)
        return {self.name: np.ascontiguousarray(x, dtype=self.dtype)}

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(arrays[self.name], dtype=np.float32)

    def tolerance(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.dtype == "float32":
            return np.zeros((), np.float32)
        # |x − x̂| ≤ 2^-11·|x| for normal halves, half a subnormal spacing (2^-25) below 2^-14
        return np.abs(self.decode(arrays)) * (2.0**-11 * (1 + 2.0**-10)) + 2.0**-25


@dataclass(frozen=True)
class ScaledInt8Codec(TensorCodec):
    """Symmetric int8 with one float16 scale per [.., M] vector (M = last axis, e.g. D per (row, patch)).

    step=None: scale = max|x| / 127 (plain int8). step=s: scale = max(s, max|x| / 127), i.e. a fixed step
    that widens only where 127 steps would not reach max|x|, so nothing ever clips. Scales are rounded *up*
    to float16, so |x| ≤ 127·scale holds exactly.
    """

    name: str
    scale_name: str
    step: float | None = None
    compressor: str = "zstd"

    def layouts(self, trailing: tuple[int, ...], dims: tuple[str, ...]) -> list[ArrayLayout]:
        return [
            ArrayLayout(self.name, trailing, dims, "int8", self.compressor),
            ArrayLayout(self.scale_name, trailing[:-1], dims[:-1], "float16", "zstd"),
        ]

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        scale = np.abs(x).max(axis=-1) / np.float32(127)
        _require_finite(scale, f"{self.name} scale", FP16_MAX)  # a NaN or inf in a vector reaches its max
        if self.step is not None:
            scale = np.maximum(scale, np.float32(self.step))
        scale16 = fp16_round_up(scale)
        return {self.name: quantize(x, scale16[..., None], -127, 127, np.int8), self.scale_name: scale16}

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        scale = np.asarray(arrays[self.scale_name], dtype=np.float32)[..., None]
        return arrays[self.name].astype(np.float32) * scale  # exact: 7-bit × 11-bit products fit float32

    def tolerance(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(arrays[self.scale_name], dtype=np.float32)[..., None] * (0.5 + _SLACK)


@dataclass(frozen=True)
class AffineUint8Codec(TensorCodec):
    """uint8 over each [.., M] vector's own range: x̂ = offset + q·scale, offset = min, scale = (max−min)/255.

    offset is rounded *down* and scale *up* to float16, so every value of the vector maps into 0..255 and the
    error is at most scale/2. A constant vector is stored exactly (scale 0, offset = its value, if float16
    holds it; otherwise one float16 spacing).
    """

    name: str
    scale_name: str
    offset_name: str
    compressor: str = "zstd"

    def layouts(self, trailing: tuple[int, ...], dims: tuple[str, ...]) -> list[ArrayLayout]:
        return [
            ArrayLayout(self.name, trailing, dims, "uint8", self.compressor),
            ArrayLayout(self.scale_name, trailing[:-1], dims[:-1], "float16", "zstd"),
            ArrayLayout(self.offset_name, trailing[:-1], dims[:-1], "float16", "zstd"),
        ]

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        lo, hi = x.min(axis=-1), x.max(axis=-1)
        _require_finite(np.stack([lo, hi]), self.name, FP16_MAX)  # NaN and inf reach the row's min or max
        offset16 = fp16_round_down(lo)
        offset = offset16.astype(np.float32)[..., None]
        scale16 = fp16_round_up((hi - offset[..., 0]) / np.float32(255))
        q = quantize(x - offset, scale16[..., None], 0, 255, np.uint8)
        return {self.name: q, self.scale_name: scale16, self.offset_name: offset16}

    def decode(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        scale = np.asarray(arrays[self.scale_name], dtype=np.float32)[..., None]
        offset = np.asarray(arrays[self.offset_name], dtype=np.float32)[..., None]
        return offset + arrays[self.name].astype(np.float32) * scale

    def tolerance(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        scale = np.asarray(arrays[self.scale_name], dtype=np.float32)[..., None]
        offset = np.asarray(arrays[self.offset_name], dtype=np.float32)[..., None]
        fp16_gap = np.where(scale > 0, 0, np.abs(offset) * 2.0**-10 + 2.0**-24)  # offset of a constant row
        return scale * (0.5 + _SLACK) + (np.abs(offset) + 255 * scale) * 2.0**-23 + fp16_gap


@dataclass(frozen=True)
class Codec:
    """A named pair of tensor codecs: features [n, L, D] and attention [n, 1+k, H, L]."""

    name: str
    features: TensorCodec
    attention: TensorCodec
    summary: str

    def layouts(self, patches: int, dim: int, queries: int, heads: int) -> list[ArrayLayout]:
        """Every array this codec stores, features' first (trailing shapes after (view, row))."""
        return [
            *self.features.layouts((patches, dim), ("patch", "channel")),
            *self.attention.layouts((queries, heads, patches), ("query", "head", "key")),
        ]


CODECS: dict[str, Codec] = {
    "fp32": Codec("fp32", FloatCodec("features", "float32"), FloatCodec("attention", "float32"),
                  "float32 features and attention (exact)"),
    "fp16": Codec("fp16", FloatCodec("features", "float16"), FloatCodec("attention", "float16"),
                  "float16 features and attention (relative error 2^-11)"),
    "int8": Codec("int8", ScaledInt8Codec("features", "feature_scale"), FloatCodec("attention", "float16"),
                  "int8 features with a float16 max-abs scale per (row, patch); float16 attention"),
    "ecq": Codec("ecq", ScaledInt8Codec("features", "feature_scale", step=ECQ_FEATURE_STEP),
                 AffineUint8Codec("attention", "attention_scale", "attention_offset"),
                 "entropy-coded quantisation: int8 features at step 0.35 + zstd; uint8 attention per row"),
}


def get_codec(name: str) -> Codec:
    """The codec called `name`; UserError listing the choices otherwise."""
    if name not in CODECS:
        raise UserError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]
