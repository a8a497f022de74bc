"""`tec make-shards`: shuffle a source once (seeded) and write it as WebDataset shards plus manifest."""

from __future__ import annotations

import logging
import os

import numpy as np
from tqdm import tqdm

from tec_pipeline import storage
from tec_pipeline.data.shards import MANIFEST, Manifest, ShardWriter, make_manifest, write_manifest
from tec_pipeline.data.sources import iter_items, open_source
from tec_pipeline.errors import UserError

log = logging.getLogger(__name__)


def prepare_output(out: str, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones unless asked; with --overwrite remove only our own files.

    `out` is a directory or a URL prefix (an object store needs no directory: objects are created by name)."""
    storage.check_location(out, "--out")
    local = storage.local_path(out)
    if not storage.is_url(out) and os.path.exists(local) and not os.path.isdir(local):
        raise UserError(f"--out {out} exists and is not a directory")
    listable = storage.is_url(out) or os.path.isdir(local)
    names = storage.list_files(out, "") if listable else []
    existing = [n for n in names if n.endswith(".tar")] + [n for n in names if n == MANIFEST]
    if existing and not overwrite:
        raise UserError(f"{out} already holds shards ({existing[0]}, ...); pass --overwrite or choose another --out")
    for name in existing:
        storage.remove(storage.join(out, name))
    if not storage.is_url(out):
        os.makedirs(local, exist_ok=True)


def write_shards(source_spec: str, out: str | os.PathLike[str], split: str = "train", shard_size: int = 1000,
                 limit: int | None = None, seed: int = 0, overwrite: bool = False,
                 progress: bool = True) -> Manifest:
    """Write the (shuffled, optionally limited) source into `{split}-{index:06d}.tar` shards; return the manifest."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    source = open_source(source_spec, split)
    out = os.fspath(out)
    prepare_output(out, overwrite)
    order = np.random.default_rng(seed).permutation(len(source.items))
    if limit is not None:
        order = order[:limit]
    writer = ShardWriter(out, split, shard_size)
    for item, data in tqdm(iter_items(source, order), total=len(order), desc="make-shards", unit="img",
                           disable=not progress):
        writer.write(item.key, data, item.ext, item.label)
    manifest = make_manifest(writer.finish(), source.class_names, source.description, split)
    write_manifest(out, manifest)
    log.info("wrote %d samples in %d shards to %s (fingerprint %s)", manifest.total_rows, len(manifest.shards),
             out, manifest.fingerprint[:12])
    return manifest
