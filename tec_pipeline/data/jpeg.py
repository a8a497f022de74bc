"""JPEG decoding straight into a numpy array with simplejpeg, for the `torch` replay.

simplejpeg and Pillow both wrap libjpeg-turbo and decode with its accurate integer DCT and fancy upsampling, so
they give the same pixels (tests/test_jpeg.py: baseline, progressive, 4:2:0, 4:2:2, 4:4:4, grayscale, low
quality, scikit-image's photos); simplejpeg writes them into an HWC array directly, where Pillow decodes into
its own image and then copies out (1.4–1.9 vs 0.85–1.07 CPU-ms per 500x375 JPEG, interleaved on this host).
Anything simplejpeg does not decode cleanly (CMYK, a damaged or recoverably corrupt stream, another format
behind a .jpg name) is left to Pillow, which then decides as it always has. Stage 1 and stage 2 decode so
for the torch replay (`decode_for_replay`); `verify` decodes with Pillow, which gives the same pixels. The
versions are recorded with the replay (data/views.py `REPLAYS`), so a store is replayed only where they match.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image

from tec_pipeline.data.shards import Sample, decode_fields, image_field, sample_label

JPEG_EXTS = ("jpg", "jpeg")
DECODER = f"simplejpeg {simplejpeg.__version__}"
SAME_PIXELS_AS_PIL = ("YCbCr", "Gray")  # the JPEG colour spaces decoded here (tests/test_jpeg.py)


def decode_jpeg_rgb(data: bytes) -> np.ndarray | None:
    """RGB uint8 [H, W, 3] of a clean JPEG, or None to leave `data` to Pillow."""
    try:
        # CMYK, YCCK (and Adobe RGB, untested) go to Pillow: libjpeg-turbo's CMYK to RGB rounds otherwise
        if simplejpeg.decode_jpeg_header(data)[2] not in SAME_PIXELS_AS_PIL:
            return None
        # strict: a recoverable libjpeg warning (corrupt data, early end) goes to Pillow, whose pixels count
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except ValueError:
        return None


def decode_for_replay(row: int, key: str | None, fields: dict[str, bytes] | None, replay: str) -> Sample:
    """The Sample of one shard record with its image as `replay` reads it: for the torch replay a clean JPEG
    decoded by simplejpeg into an RGB array [H, W, 3] (stage 1 and stage 2 alike); anything else, and for the
    pil replay everything, a PIL image as `decode_fields` gives it (image None when it does not decode)."""
    if replay == "torch" and fields and key is not None and (ext := image_field(fields)) in JPEG_EXTS:
        array = decode_jpeg_rgb(fields[ext])
        if array is not None:
            return Sample(row, key, array, sample_label(fields))  # type: ignore[arg-type]  # torch replay reads arrays
    return decode_fields(row, key, fields)


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of a decoded image, a PIL image or an HWC array."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size
