"""Image sources for `tec make-shards`: Fashion-MNIST IDX files and ImageFolder trees.

A source yields `SourceItem`s in a stable order; make-shards shuffles that order once (seeded) before writing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tec_pipeline.errors import UserError

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif",
                    ".tif": "tiff", ".tiff": "tiff"}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class SourceItem:
    """One image to shard: `key` is unique, stable and dot-free (webdataset splits keys at dots)."""

    key: str
    label: int | None
    ext: str
    load: tuple  # (kind, payload): ("file", path) or ("gray", index) — resolved by `SourceImages.encode`


class SourceImages:
    """An ordered, indexable collection of source images with their class names."""

    def __init__(self, description: str, items: list[SourceItem], class_names: list[str],
                 gray: np.ndarray | None = None) -> None:
        self.description = description
        self.items = items
        self.class_names = class_names
        self._gray = gray

    def encode(self, item: SourceItem) -> bytes:
        """The bytes written into the shard: original file bytes, or a lossless PNG of an IDX image."""
        kind, payload = item.load
        if kind == "file":
            return Path(payload).read_bytes()
        buf = io.BytesIO()
        assert self._gray is not None
        Image.fromarray(self._gray[payload], mode="L").save(buf, format="PNG", optimize=False)
        return buf.getvalue()


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX (MNIST format) array from a .gz or plain file."""
    candidates = [path.with_name(path.name + ".gz"), path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"missing IDX file {candidates[0]}: is this a Fashion-MNIST directory?")
    try:
        opener = gzip.open if found.suffix == ".gz" else open
        with opener(found, "rb") as f:
            data = f.read()
        got_magic = int.from_bytes(data[:4], "big")
        if got_magic != magic:
            raise ValueError(f"magic {got_magic} != {magic}")
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, EOFError, ValueError) as e:
        raise UserError(f"cannot read IDX file {found} ({e}); re-install dataset-fashion-mnist") from None


def fashion_mnist(directory: str | None, split: str) -> SourceImages:
    """Fashion-MNIST from IDX files (Debian's dataset-fashion-mnist by default)."""
    if split not in _IDX_FILES:
        raise UserError(f"unknown split {split!r} for fashion-mnist; use train or test")
    root = Path(directory or DEFAULT_FASHION_MNIST_DIR)
    if not root.is_dir():
        hint = " (install the Debian package dataset-fashion-mnist, or run `make install`)" if directory is None else ""
        raise UserError(f"Fashion-MNIST directory not found: {root}{hint}")
    image_file, label_file = _IDX_FILES[split]
    images = _read_idx(root / image_file, 2051)
    labels = _read_idx(root / label_file, 2049)
    if len(images) != len(labels):
        raise UserError(f"{root}: {len(images)} images but {len(labels)} labels")
    items = [SourceItem(f"fmnist-{split}-{i:05d}", int(labels[i]), "png", ("gray", i)) for i in range(len(images))]
    return SourceImages(f"fashion-mnist:{root}:{split}", items, list(FASHION_MNIST_CLASSES), gray=images)


def _safe_key(relative: str) -> str:
    """A readable, dot-free, unique key for a relative path (a short hash keeps sanitised names distinct)."""
    digest = hashlib.sha1(relative.encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.rsplit(".", 1)[0])[-80:]
    return f"{stem}-{digest}"


def image_folder(directory: str) -> SourceImages:
    """An ImageFolder tree: one sub-folder per class (sorted), image files inside (sorted)."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class sub-folders; expected DIR/<class>/<image files>")
    items = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            ext = IMAGE_EXTENSIONS.get(path.suffix.lower())
            if ext and path.is_file():
                relative = path.relative_to(root).as_posix()
                items.append(SourceItem(_safe_key(relative), label, ext, ("file", str(path))))
    if not items:
        raise UserError(f"{root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return SourceImages(f"imagefolder:{root}", items, classes)


def open_source(spec: str, split: str) -> SourceImages:
    """`fashion-mnist`, `fashion-mnist:DIR` or `imagefolder:DIR`."""
    scheme, _, rest = spec.partition(":")
    if scheme == "fashion-mnist":
        return fashion_mnist(rest or None, split)
    if scheme == "imagefolder":
        if not rest:
            raise UserError("imagefolder needs a directory: imagefolder:DIR")
        return image_folder(rest)
    raise UserError(f"unknown source {spec!r}; use fashion-mnist[:DIR] or imagefolder:DIR")


def iter_items(source: SourceImages, order: np.ndarray) -> Iterator[tuple[SourceItem, bytes]]:
    for index in order:
        item = source.items[int(index)]
        yield item, source.encode(item)
