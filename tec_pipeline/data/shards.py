"""WebDataset shards and their manifest: the contract of design §3.1.

Shards are plain tars named `{split}-{index:06d}.tar`; a sample is `KEY.<jpg|png|...>` plus optional `KEY.cls`.
`manifest.json` lists each shard's name, count, sha256 and first row. A sample's *row* is its shard's first
row plus its position in the shard: rows join shards, views and targets, so shards are never reordered.
A shard directory is a local path or an fsspec URL (storage.py): tars are read and written as streams.
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
from typing import IO

from PIL import Image
from tqdm import tqdm

from tec_pipeline import storage
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
    with storage.open_input(path) as f:
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


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> str:
    path = storage.join(directory, MANIFEST)
    storage.write_bytes(path, json.dumps(manifest.to_json(), indent=1).encode())
    return path


def _require_shard_dir(directory: str, flag: str) -> None:
    """UserError unless `directory` is an existing local directory or a usable URL (storage.check_location)."""
    storage.check_location(directory, flag)
    if not storage.is_url(directory) and not os.path.isdir(storage.local_path(directory)):
        raise UserError(f"shard directory not found: {directory}")


def load_manifest(directory: str | os.PathLike[str], flag: str = "--shards") -> Manifest:
    """The manifest of a shard directory (path or URL); UserError when missing or malformed."""
    directory = os.fspath(directory)
    path = storage.join(directory, MANIFEST)
    _require_shard_dir(directory, flag)
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"no {MANIFEST} in {directory}; run `tec make-shards` or `tec index-shards {directory}`"
                        ) from None
    try:
        data = json.loads(text)
        shards = tuple(ShardInfo(**s) for s in data["shards"])
        return Manifest(shards, tuple(data.get("class_names", ())), data.get("source", ""), data.get("split", ""),
                        data["fingerprint"], tuple(data.get("skipped", ())))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid manifest ({e.__class__.__name__}: {e})") from None


class _HashingWriter:
    """A write-only file that hashes what passes through (tarfile needs only write and tell), so a shard's
    sha256 costs no second read, which on object storage would be a second download."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha256, self.position = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.position += len(data)
        return self.out.write(data)

    def tell(self) -> int:
        return self.position


class ShardWriter:
    """Writes samples into size-limited tars with reproducible bytes (fixed mtime/owner), then the manifest."""

    def __init__(self, directory: str | os.PathLike[str], split: str, shard_size: int) -> None:
        self.directory, self.split, self.shard_size = os.fspath(directory), split, shard_size
        self.entries: list[tuple[str, int, str]] = []
        self._tar: tarfile.TarFile | None = None
        self._file: IO[bytes] | None = None
        self._hash: _HashingWriter | None = None
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None or self._file is None or self._hash is None:
            return
        self._tar.close()
        self._file.close()  # an object appears (its last part is uploaded) only now
        self.entries.append((self._current_name(), self._count, self._hash.sha256.hexdigest()))
        self._tar, self._file, self._hash, self._count = None, None, None, 0

    def _current_name(self) -> str:
        return f"{self.split}-{len(self.entries):06d}.tar"

    def write(self, key: str, image_bytes: bytes, ext: str, label: int | None) -> None:
        if self._tar is None:
            self._file = storage.open_output(storage.join(self.directory, self._current_name()))
            self._hash = _HashingWriter(self._file)
            self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
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
            im.load()
            # an RGB image is returned as decoded: convert("RGB") would only copy it (~0.4 ms at 500x375)
            return im if im.mode == "RGB" else im.convert("RGB")
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


def iter_tar_samples(path: str | os.PathLike[str], wanted: Callable[[int], bool] | None = None,
                     skipped: list[str] | None = None) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """(key, {ext: bytes}) per sample in tar order, grouping consecutive members by key.

    The tar (a path or URL) is read front to back, seekable, so samples whose index (position in the shard) is
    not `wanted` are skipped without reading their data (fields None); over a URL, without fetching the blocks
    they fill. A sample with no image member (say a stray KEY.txt) is not a sample: it takes no row, and is named in `skipped` ("shard.tar:KEY (member, ...)") when a list is given. A
    truncated or damaged tar ends quietly after its last complete sample: the partial sample is dropped because
    its data cannot be trusted.
    """
    def close(key: str, members: list[tarfile.TarInfo], index: int) -> tuple[str, dict[str, bytes] | None] | None:
        if _has_image(members):
            return key, _read_members(tar, members, wanted is None or wanted(index))
        if skipped is not None:
            skipped.append(f"{name}:{key} ({', '.join(m.name for m in members)})")
        return None

    name = storage.basename(path)
    try:
        with storage.open_input(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
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
        log.warning("shard %s is damaged: %s", name, e)


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


def count_tar_samples(path: str | os.PathLike[str], skipped: list[str] | None = None) -> int:
    """Samples (with an image) in the tar; those without one are appended to `skipped`."""
    return sum(1 for _ in iter_tar_samples(path, wanted=lambda _: False, skipped=skipped))


def image_field(fields: dict[str, bytes]) -> str | None:
    """The extension of the field a sample's image is decoded from (the first of IMAGE_EXTS it has)."""
    return next((e for e in IMAGE_EXTS if e in fields), None)


def sample_label(fields: dict[str, bytes]) -> int | None:
    """The sample's class from its `cls` field, None when it has none (or not an integer)."""
    return int(fields["cls"]) if "cls" in fields and fields["cls"].strip().lstrip(b"-").isdigit() else None


def _to_sample(row: int, key: str, fields: dict[str, bytes]) -> Sample:
    ext = image_field(fields)
    image = _decode_image(fields[ext], key) if ext else None
    return Sample(row, key, image, sample_label(fields))


def decode_fields(row: int, key: str | None, fields: dict[str, bytes] | None) -> Sample:
    """The Sample of one shard record from `iter_shard_fields` (image None when absent or undecodable)."""
    return Sample(row, key, None, None) if fields is None or key is None else _to_sample(row, key, fields)


def iter_shard_fields(directory: str | os.PathLike[str], shard: ShardInfo, start: int, stop: int,
                      wanted: set[int] | None = None) -> Iterator[tuple[int, str | None, dict[str, bytes] | None]]:
    """(row, key, encoded fields) of rows [start, stop) of one shard, in order, nothing decoded.

    Rows not in `wanted` (when given) come without their data (fields None); a missing tail (truncated tar)
    comes as (row, None, None).
    """
    first, end = shard.first_row, min(stop, shard.first_row + shard.count)

    def read(index: int) -> bool:
        return start <= first + index < end and (wanted is None or first + index in wanted)

    row = first
    for key, fields in iter_tar_samples(storage.join(directory, shard.name), read):
        if row >= end:
            return
        if row >= start:
            yield row, key, fields
        row += 1
    for missing in range(max(row, start), end):
        yield missing, None, None


def iter_fields(directory: str | os.PathLike[str], start_row: int = 0, stop_row: int | None = None,
                manifest: Manifest | None = None) -> Iterator[tuple[int, str | None, dict[str, bytes] | None]]:
    """(row, key, encoded fields) in manifest (row) order over [start_row, stop_row), nothing decoded; rows of a
    missing tail come as (row, None, None). For a caller that decodes itself (stage 1's torch replay)."""
    manifest = manifest or load_manifest(directory)
    stop_row = manifest.total_rows if stop_row is None else stop_row
    for shard in manifest.shards:
        if shard.first_row + shard.count <= start_row or shard.first_row >= stop_row:
            continue
        yield from iter_shard_fields(directory, shard, start_row, stop_row)


def iter_samples(directory: str | os.PathLike[str], start_row: int = 0, stop_row: int | None = None,
                 manifest: Manifest | None = None) -> Iterator[Sample]:
    """Samples in manifest (row) order from `start_row` (inclusive) to `stop_row` (exclusive)."""
    for row, key, fields in iter_fields(directory, start_row, stop_row, manifest):
        yield decode_fields(row, key, fields)


def index_shards(directory: str | os.PathLike[str], class_names: list[str] | None = None,
                 progress: bool = False) -> Manifest:
    """A manifest for existing WebDataset shards (*.tar in name order; a path or URL): counts by reading,
    sha256 by hashing. `progress`: a tqdm bar over the shards."""
    directory = os.fspath(directory)
    _require_shard_dir(directory, "DIRECTORY")
    tars = storage.list_files(directory, ".tar")
    if not tars:
        raise UserError(f"no .tar shards in {directory}")
    skipped: list[str] = []
    entries = [(name, count_tar_samples(path := storage.join(directory, name), skipped), file_sha256(path))
               for name in tqdm(tars, desc="shards indexed", unit="shard", disable=not progress, dynamic_ncols=True,
                                leave=False)]
    split = tars[0].rsplit("-", 1)[0] if "-" in tars[0] else ""
    if skipped:
        log.warning("%d tar sample(s) without an image skipped (no row, listed in the manifest): %s",
                    len(skipped), "; ".join(skipped[:10]) + ("; ..." if len(skipped) > 10 else ""))
    manifest = make_manifest(entries, class_names or [], f"index-shards:{directory}", split)
    return dataclasses.replace(manifest, skipped=tuple(skipped))
