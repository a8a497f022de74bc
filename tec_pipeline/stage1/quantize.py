"""The quantising codecs' encoders (int8, ecq: store/codecs.py) in torch, run on the device in stage 1.

The targets leave the device already in stored form: 1 byte per element plus small float16 scales, instead of
float32 (4 bytes) for the host to quantise, so ~4x fewer bytes cross and the host only compresses and writes.
Every step is the numpy encoder's, in the same order and precision (float32 max, one division, the float16
cast with round-to-nearest-even and one `nextafter` step to round up or down, a multiply by the reciprocal,
round half to even, clip, integer cast: IEEE operations with one correct result), so the arrays are bit for
bit `TensorCodec.encode`'s (tests/test_device_codecs.py).
"""

from __future__ import annotations

import torch

from tec_pipeline.store.codecs import FP16_MAX, AffineUint8Codec, ScaledInt8Codec, TensorCodec


def encodes_on_device(part: TensorCodec) -> bool:
    """Whether `part` has a device encoder here (the float codecs are a cast, done by compute_task)."""
    return isinstance(part, (ScaledInt8Codec, AffineUint8Codec))


def device_encode(part: TensorCodec, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`part.encode` of float32 `x` [n, ..., M] on x's device: (arrays named as part.layouts, a 0-d bool that
    is True where the numpy encoder would have refused x: NaN, inf, or beyond float16). Checked by the caller
    once per task, so the device is not synchronised per batch."""
    x = x.float()
    if isinstance(part, ScaledInt8Codec):
        scale = x.abs().amax(dim=-1) / 127
        refused = ~(scale <= FP16_MAX)  # NaN fails every comparison; an inf reaches the max
        if part.step is not None:
            scale = torch.clamp_min(scale, part.step)
        scale16 = _fp16_round(scale, up=True)
        return {part.name: _quantize(x, scale16, -127, 127, torch.int8), part.scale_name: scale16}, refused.any()
    if isinstance(part, AffineUint8Codec):
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)
        refused = ~((lo.abs() <= FP16_MAX) & (hi.abs() <= FP16_MAX))
        offset16 = _fp16_round(lo, up=False)
        offset = offset16.float()
        scale16 = _fp16_round((hi - offset) / 255, up=True)
        q = _quantize(x - offset[..., None], scale16, 0, 255, torch.uint8)
        return {part.name: q, part.scale_name: scale16, part.offset_name: offset16}, refused.any()
    raise TypeError(f"no device encoder for {type(part).__name__}")


def _fp16_round(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The float16 nearest x in the direction asked (codecs.fp16_round_up / fp16_round_down)."""
    h = x.half()
    if up:
        return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _quantize(x: torch.Tensor, scale16: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """codecs.quantize: round(x · (1/scale)) clipped to [lo, hi]; 0 where the scale is 0."""
    s = scale16.float()[..., None]
    inv = torch.where(s > 0, torch.div(1.0, s), torch.zeros_like(s))
    return torch.round(x * inv).clamp_(lo, hi).to(dtype)
