"""`tec make-shards` and `tec index-shards`: images -> WebDataset shards + manifest.json."""

from __future__ import annotations

import click

from tec_pipeline.config import config_option
from tec_pipeline.data.shards import index_shards, write_manifest
from tec_pipeline.data.writing import write_shards
from tec_pipeline.logs import progress_enabled
from tec_pipeline.outputs import require_writable, write_errors
from tec_pipeline.storage import storage_options_option


@click.command("make-shards")
@config_option
@storage_options_option
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory or URL (s3://bucket/prefix) for shards + manifest.json.")
@click.option("--split", default="train", show_default=True, help="Fashion-MNIST split (train|test); shard name prefix.")
@click.option("--shard-size", default=1000, show_default=True, type=int, help="Samples per shard.")
@click.option("--limit", default=None, type=int, help="Write only the first N samples after shuffling.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the one-time shuffle.")
@click.option("--overwrite", is_flag=True, help="Replace shards already in --out.")
def command(source: str, out: str, split: str, shard_size: int, limit: int | None, seed: int, overwrite: bool) -> None:
    """Write SOURCE (fashion-mnist[:DIR] or imagefolder:DIR) as shuffled WebDataset shards."""
    require_writable(out)
    with write_errors(out, "rerun with --overwrite once the destination can take the shards"):
        manifest = write_shards(source, out, split, shard_size, limit, seed, overwrite, progress=progress_enabled())
    click.echo(f"{manifest.total_rows} samples, {len(manifest.shards)} shards -> {out}/manifest.json "
               f"(fingerprint {manifest.fingerprint[:12]})")


@click.command("index-shards")
@config_option
@storage_options_option
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--class-names", default=None, help="Comma-separated class names, in label order.")
def index_command(directory: str, class_names: str | None) -> None:
    """Write manifest.json for existing WebDataset shards in DIRECTORY or URL (*.tar in name order)."""
    manifest = index_shards(directory, class_names.split(",") if class_names else None,
                            progress=progress_enabled())
    path = write_manifest(directory, manifest)
    skipped = f", {len(manifest.skipped)} tar samples without an image skipped" if manifest.skipped else ""
    click.echo(f"{manifest.total_rows} samples, {len(manifest.shards)} shards{skipped} -> {path}")
