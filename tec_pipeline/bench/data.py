"""The benchmark's own inputs, all temporary: shards, a random base model in this project's format, stores.

Fashion-MNIST comes from the installed IDX files (generated 28 px images stand in when they are missing);
`photos` are JPEG crops of scikit-image's bundled sample photos at varied sizes (generated textures without
scikit-image), the decode work of a real photo data set.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import tec_pipeline
from tec_pipeline.bench.presets import BenchPreset
from tec_pipeline.data.shards import Manifest, ShardWriter, load_manifest, make_manifest, write_manifest
from tec_pipeline.data.sources import DEFAULT_FASHION_MNIST_DIR
from tec_pipeline.data.views import sample_view, view_constants
from tec_pipeline.data.writing import write_shards
from tec_pipeline.models.vit import build_vit, resolve_arch
from tec_pipeline.stage1 import CacheConfig
from tec_pipeline.store.layout import StoreSpec
from tec_pipeline.store.target_store import TargetStore

log = logging.getLogger(__name__)
SHARD_SIZE = 256
PHOTO_NAMES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


@dataclass(frozen=True)
class BenchData:
    """Paths of one benchmark's inputs: shards of `rows` images, shards `memory_factor` times larger, base model."""

    root: Path
    shards: Path
    large_shards: Path
    base_model: Path
    rows: int
    source: str

    def cache_config(self, preset: BenchPreset, out: Path, device: str, large: bool = False,
                     codec: str = "fp16") -> CacheConfig:
        """Stage-1 settings of the benchmark's stores (the `tec cache-targets` defaults, preset sizes)."""
        return CacheConfig(shards=str(self.large_shards if large else self.shards), base_model=str(self.base_model),
                           out=str(out), views=preset.views, topk=preset.topk, last_layers=preset.last_layers,
                           codec=codec, chunk_rows=preset.chunk_rows, batch_size=preset.batch,
                           loader_workers=preset.loader_workers, device=device)


def save_random_base(path: Path, arch_name: str, seed: int = 0) -> Path:
    """A randomly initialised base model as our own checkpoint: {'model', 'arch', 'kind', 'config', 'version'}."""
    torch.manual_seed(seed)
    arch = resolve_arch(arch_name)
    torch.save({"model": build_vit(arch).state_dict(), "arch": arch.to_dict(), "kind": "mae", "config": {},
                "version": tec_pipeline.__version__}, path)
    return path


def sample_photos() -> list[Image.Image]:
    try:
        import skimage
    except ImportError:
        return []
    data = Path(skimage.__file__).parent / "data"
    return [Image.open(data / n).convert("RGB") for n in PHOTO_NAMES if (data / n).is_file()]


def _generated(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth random texture (compresses like a photo, unlike white noise)."""
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def photo_crop(photos: list[Image.Image], i: int, rng: np.random.Generator, w: int, h: int,
               min_scale: float) -> Image.Image:
    """A w×h image: a random crop (min_scale..1 of each side) of sample photo i, or generated noise without
    scikit-image."""
    if not photos:
        return _generated(rng, h, w)
    photo = photos[i % len(photos)]
    scale = rng.uniform(min_scale, 1.0)
    cw, ch = int(photo.width * scale), int(photo.height * scale)
    left, top = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
    return photo.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)


def write_image_folder(root: Path, count: int, kind: str, seed: int = 0) -> Path:
    """`count` images in two class folders: 'photos' (JPEG crops, 256-512 px) or 'gray28' (28 px PNG)."""
    rng = np.random.default_rng(seed)
    photos = sample_photos() if kind == "photos" else []
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        folder = root / ("a", "b")[i % 2]
        if kind == "gray28":
            _generated(rng, 28, 28).convert("L").save(folder / f"{i:06d}.png")
            continue
        w, h = int(rng.integers(256, 513)), int(rng.integers(256, 513))
        photo_crop(photos, i, rng, w, h, min_scale=0.5).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _source_spec(preset: BenchPreset, root: Path, count: int) -> str:
    if preset.source == "fashion-mnist" and Path(DEFAULT_FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file():
        return "fashion-mnist"
    kind = "photos" if preset.source == "photos" else "gray28"
    return f"imagefolder:{write_image_folder(root / f'images-{count}', count, kind)}"


def prepare_data(preset: BenchPreset, root: Path) -> BenchData:
    """Shards of `preset.images` rows and of memory_factor times as many, plus a random base model, under root."""
    large_rows = preset.images * preset.memory_factor
    spec = _source_spec(preset, root, large_rows)
    shards, large = root / "shards", root / "shards-large"
    # the small shards are the first rows of the large ones' source order: the same images, fewer of them
    write_shards(spec, shards, "train", shard_size=SHARD_SIZE, limit=preset.images, seed=0, progress=False)
    write_shards(spec, large, "train", shard_size=SHARD_SIZE, limit=large_rows, seed=0, progress=False)
    base = save_random_base(root / "base.pth", preset.arch)
    log.info("bench data: %d and %d images from %s, random %s base model", preset.images, large_rows,
             spec.split(":")[0], preset.arch)
    return BenchData(root, shards, large, base, preset.images, spec.split(":")[0])


# A ViT-B/16 base model's targets: L = 196 patches of D = 768, H = 12 heads, top-k = 15 rows; input 224 px
VIT_B_TARGETS = {"patches": 196, "dim": 768, "heads": 12, "k": 15, "img_size": 224}
IMAGENET_SIZE = (500, 375)  # the typical ImageNet training image (width, height)
PHOTO_VARIANTS = 32


def photo_size(row: int) -> tuple[int, int]:
    """(width, height) of row `row` of `write_photo_shards`: one in four is portrait."""
    return IMAGENET_SIZE if (row % PHOTO_VARIANTS) % 4 else IMAGENET_SIZE[::-1]


def write_photo_shards(out: Path, rows: int, seed: int = 0) -> Manifest:
    """Shards of `rows` ImageNet-sized JPEGs: PHOTO_VARIANTS different 500×375 (or 375×500) quality-90 crops of
    the sample photos, cycled (the loader's memory depends on the bytes per image, not on their variety)."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    encoded = []
    for i in range(PHOTO_VARIANTS):
        image = photo_crop(photos, i, rng, *photo_size(i), min_scale=0.6)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "train", SHARD_SIZE)
    for row in range(rows):
        writer.write(f"{row:08d}", encoded[row % PHOTO_VARIANTS], "jpg", row % 2)
    manifest = make_manifest(writer.finish(), ["a", "b"], "bench:photos-imagenet-size", "train")
    write_manifest(out, manifest)
    return manifest


def write_synthetic_store(url: Path, shards: Path, chunk_rows: int, codec: str = "fp16", seed: int = 0) -> Path:
    """A one-view store of ViT-B shape for `shards`: random targets (one chunk's worth, written to every task),
    real view boxes. Enough for stage 2's loader, which never looks at what the targets mean."""
    manifest = load_manifest(shards)
    t = VIT_B_TARGETS
    spec = StoreSpec(views=1, rows=manifest.total_rows, patches=t["patches"], dim=t["dim"], heads=t["heads"],
                     k=t["k"], chunk_rows=chunk_rows, codec=codec)
    attrs = {"base_model": {"source": "synthetic ViT-B/16", "input_size": t["img_size"]},
             "views": {"count": 1, **view_constants(t["img_size"], seed)},
             "data": {"fingerprint": manifest.fingerprint, "rows": manifest.total_rows}}
    store = TargetStore.create_or_resume(url, spec, attrs)
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((chunk_rows, t["patches"], t["dim"]), dtype=np.float32)
    attention = rng.standard_normal((chunk_rows, 1 + t["k"], t["heads"], t["patches"]), dtype=np.float32)
    topk = np.stack([rng.choice(t["patches"], t["k"], replace=False) for _ in range(chunk_rows)])
    for task in store.tasks():
        n = task.rows
        boxes = np.stack([sample_view(seed, row, 0, *photo_size(row)).as_array()
                          for row in range(task.row_start, task.row_stop)])
        store.write_task(task, features[:n], attention[:n], topk[:n], boxes, np.ones(n, dtype=bool))
    return url
