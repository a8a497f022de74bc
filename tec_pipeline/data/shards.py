"""WebDataset shards and their manifest: the contract of design §3.1.

Shards are plain tars named `{split}-{index:06d}.tar`; a sample is `KEY.<jpg|png|...>` plus optional `KEY.cls`.
`manifest.json` lists each shard's name, count, sha256 and first row. A sample's *row* is its shard's first
row plus its position in the shard: rows join shards, views and targets, so shards are never reordered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tec_pipeline.errors import UserError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tec-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "ppm")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str
    first_row: int


@dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...] = ()
    source: str = ""
    split: str = ""
    fingerprint: str = field(default="")
    skipped: tuple[str, ...] = ()  # "shard.tar:KEY (members)" of tar samples without an image (index-shards)

    @property
    def total_rows(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, "total_rows": self.total_rows, "fingerprint": self.fingerprint,
                "source": self.source, "split": self.split, "class_names": list(self.class_names),
                "shards": [vars(s) for s in self.shards], "skipped_samples": len(self.skipped),
                "skipped": list(self.skipped)}


@dataclass(frozen=True)
class Sample:
    """One shard sample. `image` is None when the bytes could not be decoded (or the tar was cut short)."""

    row: int
    key: str | None
    image: Image.Image | None
    label: int | None


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(shards: Iterable[ShardInfo]) -> str:
    """sha256 of the ordered (name, count, sha256) list: identifies the exact data rows refer to."""
    text = json.dumps([[s.name, s.count, s.sha256] for s in shards])
    return hashlib.sha256(text.encode()).hexdigest()


def make_manifest(entries: list[tuple[str, int, str]], class_names: list[str], source: str, split: str) -> Manifest:
    shards, row = [], 0
    for name, count, sha in entries:
        shards.append(ShardInfo(name, count, sha, row))
        row += count
    return Manifest(tuple(shards), tuple(class_names), source, split, fingerprint(shards))


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """The manifest of a shard directory; UserError when missing or malformed."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise UserError(f"shard directory not found: {directory}")
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {directory}; run `tec make-shards` or `tec index-shards {directory}`")
    try:
        data = json.loads(path.read_text())
        shards = tuple(ShardInfo(**s) for s in data["shards"])
        return Manifest(shards, tuple(data.get("class_names", ())), data.get("source", ""), data.get("split", ""),
                        data["fingerprint"], tuple(data.get("skipped", ())))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid manifest ({e.__class__.__name__}: {e})") from None


class ShardWriter:
    """Writes samples into size-limited tars with reproducible bytes (fixed mtime/owner), then the manifest."""

    def __init__(self, directory: Path, split: str, shard_size: int) -> None:
        self.directory, self.split, self.shard_size = directory, split, shard_size
        self.entries: list[tuple[str, int, str]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self._current_name()
        self.entries.append((name, self._count, file_sha256(self.directory / name)))
        self._tar, self._count = None, 0

    def _current_name(self) -> str:
        return f"{self.split}-{len(self.entries):06d}.tar"

    def write(self, key: str, image_bytes: bytes, ext: str, label: int | None) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self.directory / self._current_name(), "w", format=tarfile.USTAR_FORMAT)
        members = [(f"{key}.{ext}", image_bytes)]
        if label is not None:
            members.append((f"{key}.cls", str(label).encode()))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.shard_size:
            self._close_shard()

    def finish(self) -> list[tuple[str, int, str]]:
        self._close_shard()
        return self.entries


def _decode_image(data: bytes, key: str) -> Image.Image | None:
    """Decoded RGB (grayscale, palette, CMYK all converted), or None for bytes PIL cannot decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        log.warning("undecodable image %s: %s", key, e)
        return None


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _has_image(members: list[tarfile.TarInfo]) -> bool:
    return any(_split_member(m.name)[1] in IMAGE_EXTS for m in members)


def iter_tar_samples(path: Path, wanted: Callable[[int], bool] | None = None, skipped: list[str] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(key, {ext: bytes}) per sample in tar order, grouping consecutive members by key.

    The tar is opened seekable, so samples whose index (position in the shard) is not `wanted` are skipped
    without reading their data (fields None). A sample with no image member (say a stray KEY.txt) is not a
    sample: it takes no row, and is named in `skipped` ("shard.tar:KEY (member, ...)") when a list is given. A
    truncated or damaged tar ends quietly after its last complete sample: the partial sample is dropped because
    its data cannot be trusted.
    """
    def close(key: str, members: list[tarfile.TarInfo], index: int) -> tuple[str, dict[str, bytes] | None] | None:
        if _has_image(members):
            return key, _read_members(tar, members, wanted is None or wanted(index))
        if skipped is not None:
            skipped.append(f"{path.name}:{key} ({', '.join(m.name for m in members)})")
        return None

    try:
        with tarfile.open(path, "r:") as tar:
            key, members, index = None, [], 0
            for member in tar:
                if not member.isfile():
                    continue
                member_key, _ = _split_member(member.name)
                if member_key != key and key is not None:
                    if (sample := close(key, members, index)) is not None:
                        yield sample
                        index += 1
                    members = []
                key = member_key
                members.append(member)
            if key is not None and (sample := close(key, members, index)) is not None:
                yield sample
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("shard %s is damaged: %s", path.name, e)


def _read_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], read: bool) -> dict[str, bytes] | None:
    if not read:
        return None
    fields = {}
    for member in members:
        extracted = tar.extractfile(member)
        data = extracted.read() if extracted else b""
        if len(data) != member.size:
            raise tarfile.ReadError(f"unexpected end of data in {member.name}")
        fields[_split_member(member.name)[1]] = data
    return fields


def count_tar_samples(path: Path, skipped: list[str] | None = None) -> int:
    """Samples (with an image) in the tar; those without one are appended to `skipped`."""
    return sum(1 for _ in iter_tar_samples(path, wanted=lambda _: False, skipped=skipped))


def _to_sample(row: int, key: str, fields: dict[str, bytes]) -> Sample:
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    image = _decode_image(fields[ext], key) if ext else None
    label = int(fields["cls"]) if "cls" in fields and fields["cls"].strip().lstrip(b"-").isdigit() else None
    return Sample(row, key, image, label)


def iter_shard_rows(directory: Path, shard: ShardInfo, start: int, stop: int,
                    wanted: set[int] | None = None) -> Iterator[Sample]:
    """Samples of rows [start, stop) of one shard, in order; a missing tail (truncated tar) yields image=None.

    Rows not in `wanted` (when given) are yielded without decoding, so callers can skip them cheaply.
    """
    first, end = shard.first_row, min(stop, shard.first_row + shard.count)

    def read(index: int) -> bool:
        return start <= first + index < end and (wanted is None or first + index in wanted)

    row = first
    for key, fields in iter_tar_samples(directory / shard.name, read):
        if row >= end:
            return
        if row >= start:
            yield Sample(row, key, None, None) if fields is None else _to_sample(row, key, fields)
        row += 1
    for missing in range(max(row, start), end):
        yield Sample(missing, None, None, None)


def iter_samples(directory: str | os.PathLike[str], start_row: int = 0, stop_row: int | None = None,
                 manifest: Manifest | None = None) -> Iterator[Sample]:
    """Samples in manifest (row) order from `start_row` (inclusive) to `stop_row` (exclusive)."""
    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    stop_row = manifest.total_rows if stop_row is None else stop_row
    for shard in manifest.shards:
        if shard.first_row + shard.count <= start_row or shard.first_row >= stop_row:
            continue
        yield from iter_shard_rows(directory, shard, start_row, stop_row)


def index_shards(directory: str | os.PathLike[str], class_names: list[str] | None = None) -> Manifest:
    """A manifest for existing WebDataset shards (*.tar in name order): counts by reading, sha256 by hashing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"shard directory not found: {directory}")
    tars = sorted(p for p in directory.iterdir() if p.suffix == ".tar" and p.is_file())
    if not tars:
        raise UserError(f"no .tar shards in {directory}")
    skipped: list[str] = []
    entries = [(p.name, count_tar_samples(p, skipped), file_sha256(p)) for p in tars]
    split = tars[0].name.rsplit("-", 1)[0] if "-" in tars[0].name else ""
    if skipped:
        log.warning("%d tar sample(s) without an image skipped (no row, listed in the manifest): %s",
                    len(skipped), "; ".join(skipped[:10]) + ("; ..." if len(skipped) > 10 else ""))
    manifest = make_manifest(entries, class_names or [], f"index-shards:{directory}", split)
    return dataclasses.replace(manifest, skipped=tuple(skipped))
