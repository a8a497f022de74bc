"""Views: the contract of design §3.2.

A view is (row, view id) -> integer crop box in decoded-image pixels plus a flip bit, drawn from a counter-based
RNG keyed by (seed, row, view id) with torchvision RandomResizedCrop semantics. Stage 1 stores the box; stage 2
replays it: crop -> bicubic antialiased resize -> optional mirror -> ToTensor -> ImageNet normalisation, so the
same box always gives bit-identical pixels.

Two replays, chosen per store by stage 1 (`--replay`) and recorded in it (`REPLAYS`); stage 2 and verify use
the recorded one and refuse a store whose record this installation cannot reproduce:
- `pil`: PIL crop + `resize(BICUBIC)`, exactly the reference pipeline (torchvision RandomResizedCrop on PIL).
- `torch`: the decoded image as a uint8 tensor, a slice for the crop, `F.interpolate(bicubic, antialias=True)`
  on uint8 (torch's integer kernel, the pillow-simd port). About 3x cheaper than PIL's resize on 500x375 photos
  (README "The host path"); the same filter, so it differs from `pil` only in rounding: by 1–3 grey levels on
  1.9 % of the values of 64 500x375 photos at 224 px, at most 4 on scikit-image's photos. Its output does not
  depend on the thread count or on ATen's CPU dispatch (default, AVX2, AVX512 gave identical bytes), so a store
  made on one host replays on another with the same versions.
Measured and not used (pixels differ between calls or from the record): one `Image.resize(size, BICUBIC,
box=...)` call (3 of 200 views equal `pil`: the filter reads outside the box), JPEG draft mode (DCT scaling
changes the decoded image), pillow-simd (another build of PIL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from tec_pipeline.data.jpeg import DECODER as JPEG_DECODER
from tec_pipeline.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALE = (0.2, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875  # resize shorter side to size / 0.875, centre-crop size (224 <- 256)
# bump a `version` whenever replay_view_into can give other pixels for the same box and image
REPLAYS = {
    "pil": {"implementation": "PIL crop, resize BICUBIC, mirror", "version": 1, "pillow": PIL.__version__},
    # stages 1 and 2 decode clean JPEGs with simplejpeg (data/jpeg.py: the same libjpeg-turbo pixels as PIL's,
    # without PIL's copy-out); verify decodes with PIL, which gives it the same pixels
    "torch": {"implementation": "JPEG by simplejpeg (else PIL), uint8 tensor crop, torch interpolate bicubic "
                                "antialias, mirror", "version": 2,
              "torch": torch.__version__, "pillow": PIL.__version__, "simplejpeg": JPEG_DECODER},
}
# Earlier records whose pixels this installation still reproduces: torch v1 decoded every image with PIL,
# whose pixels simplejpeg's equal
READABLE_RECORDS = {
    "torch": [{"implementation": "uint8 tensor crop, torch interpolate bicubic antialias, mirror", "version": 1,
               "torch": torch.__version__, "pillow": PIL.__version__}],
}
DEFAULT_REPLAY = "pil"  # the reference pipeline's own pixels; every figure in the README was made with it


@dataclass(frozen=True)
class ViewBox:
    """Crop box in decoded-image pixels: rows [top, top+height), columns [left, left+width); then mirror if flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_array(self) -> np.ndarray:
        return np.array([self.top, self.left, self.height, self.width, int(self.flip)], dtype=np.int32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> ViewBox:
        return cls(int(a[0]), int(a[1]), int(a[2]), int(a[3]), bool(a[4]))


def view_rng(seed: int, row: int, view_id: int) -> np.random.Generator:
    """Counter-based generator: the same (seed, row, view id) always gives the same stream, in any process."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, row, view_id])))


def sample_view(seed: int, row: int, view_id: int, width: int, height: int,
                scale: tuple[float, float] = DEFAULT_SCALE, ratio: tuple[float, float] = DEFAULT_RATIO,
                flip_prob: float = 0.5) -> ViewBox:
    """torchvision `RandomResizedCrop.get_params` (10 attempts, centre-crop fallback) + horizontal flip."""
    rng = view_rng(seed, row, view_id)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:
        box = _center_fallback(width, height, ratio)
    flip = bool(rng.random() < flip_prob)
    return ViewBox(*box, flip)


def _center_fallback(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def replay_source(image: Image.Image | np.ndarray, replay: str = DEFAULT_REPLAY) -> Image.Image | torch.Tensor:
    """What `replay` reads a view's pixels from, made once per image and shared by all its views: the PIL image
    itself, or (torch) its pixels as a uint8 [3, H, W] tensor over one HWC array (the crop is then a slice).
    `image` is RGB, as the shard decoder hands every image out; the torch replay also takes the decoded RGB
    array [H, W, 3] itself (stage 1's JPEGs, data/jpeg.py)."""
    if replay == "pil":
        return image
    if replay == "torch":
        return torch.from_numpy(image if isinstance(image, np.ndarray) else np.array(image)).permute(2, 0, 1)
    raise ValueError(f"unknown replay {replay!r}; one of {', '.join(REPLAYS)}")


def replay_view_into(out: torch.Tensor, source: Image.Image | torch.Tensor, box: ViewBox,
                     replay: str = DEFAULT_REPLAY) -> torch.Tensor:
    """Write the view's pixels before normalisation into `out` (uint8 [3, S, S]) and return it.

    `source` comes from `replay_source(image, replay)`. Filling a preallocated batch row saves the per-view
    tensor and its copy into the batch.
    """
    size = out.shape[-1]
    if replay == "torch":
        crop = source[None, :, box.top:box.top + box.height, box.left:box.left + box.width]
        # uint8 in, uint8 out: the integer antialiasing kernel (a float input would take the float one)
        view = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]
        return out.copy_(view.flip(-1) if box.flip else view)
    crop = source.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    if box.flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out.copy_(torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1))


def replay_view_uint8(image: Image.Image | np.ndarray, box: ViewBox, size: int,
                      replay: str = DEFAULT_REPLAY) -> torch.Tensor:
    """The view's pixels before normalisation: uint8 [3, size, size]."""
    return replay_view_into(torch.empty(3, size, size, dtype=torch.uint8), replay_source(image, replay), box, replay)


def center_view_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """Deterministic evaluation view: shorter side to round(size / 0.875) (bicubic), centre crop; uint8 [3,S,S]."""
    short = round(size / EVAL_CROP_FRACTION)
    w, h = image.size
    new_w, new_h = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = resized.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32, ToTensor then Normalize (elementwise, so per image or per batch alike)."""
    # on the pixels' device: stage 1 normalises after the uint8 copy (IEEE ops, so the same bits on any device)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    # in place: the same three roundings in the same order, without two batch-sized temporaries (2.2 -> 0.8
    # CPU-ms per 224 px image)
    return pixels.float().div_(255).sub_(mean).div_(std)


def replay_view(image: Image.Image, box: ViewBox, size: int, replay: str = DEFAULT_REPLAY) -> torch.Tensor:
    """The normalised view the base model saw: float32 [3, size, size]."""
    return normalize(replay_view_uint8(image, box, size, replay))


def view_constants(size: int, seed: int, scale: tuple[float, float] = DEFAULT_SCALE,
                   ratio: tuple[float, float] = DEFAULT_RATIO, flip_prob: float = 0.5,
                   replay: str = DEFAULT_REPLAY) -> dict:
    """What a store records so that a later replay is known to reproduce the same pixels."""
    return {"size": size, "seed": seed, "scale": list(scale), "ratio": list(ratio), "flip_prob": flip_prob,
            "interpolation": "PIL.BICUBIC", "pil_version": PIL.__version__, "decoder": _decoder(replay),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "replay": dict(REPLAYS[replay])}


def _decoder(replay: str) -> str:
    pil = f"PIL {PIL.__version__}"
    return f"{JPEG_DECODER} for clean JPEGs, {pil} otherwise" if replay == "torch" else pil


def recorded_replay(views_attrs: dict) -> str:
    """The replay (a `REPLAYS` name) whose pixels a store's views were computed on; UserError if this
    installation cannot reproduce them."""
    stored = views_attrs.get("replay")
    for name, record in REPLAYS.items():
        if stored == record or stored in READABLE_RECORDS.get(name, []):
            return name
    raise UserError(f"its views were replayed by {stored or 'an unrecorded replay (made before replay versions)'}, "
                    f"and this installation replays with {' or '.join(map(str, REPLAYS.values()))}; re-run tec "
                    "cache-targets with this installation")


def replay_mismatch(views_attrs: dict) -> str | None:
    """Why views recorded by a store (its `views` attributes) would not replay bit-identically here, or None."""
    try:
        recorded_replay(views_attrs)
    except UserError as error:
        return str(error)
    return None
