"""`tec cache-targets`: stage 1, the frozen base model once over V views of every image -> Zarr target store."""

from __future__ import annotations

import click

from stages.common import show_progress
from tec_pipeline.config import config_option, from_options
from tec_pipeline.outputs import require_writable, write_errors
from tec_pipeline.store.cache import CacheConfig, cache_targets
from tec_pipeline.store.integrity import require_readable_flags, reset_damaged_tasks


@click.command("cache-targets")
@config_option
@click.option("--shards", required=True, type=click.Path(), help="Shard directory with manifest.json.")
@click.option("--base-model", required=True, help="Base-model checkpoint (MAE, iBOT/DINO, timm, safetensors, ours).")
@click.option("--out", required=True, help="Store path or fsspec URL (e.g. store.zarr, file:///..., memory://x).")
@click.option("--base-arch", default=None, help="Architecture when the checkpoint records none (e.g. vit_base_patch16_224).")
@click.option("--views", default=2, show_default=True, type=int, help="Views per image (V).")
@click.option("--topk", default=15, show_default=True, type=int, help="k: patch-query attention rows kept.")
@click.option("--last-layers", default=2, show_default=True, type=int, help="Last blocks averaged into the feature target.")
@click.option("--codec", default="fp16", show_default=True, help="Feature encoding: fp32, fp16, int8 (see README).")
@click.option("--chunk-rows", default=256, show_default=True, type=int, help="Rows per chunk = rows per task.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Base-model batch size.")
@click.option("--seed", default=0, show_default=True, type=int, help="View seed: boxes come from (seed, row, view).")
@click.option("--limit", default=None, type=int, help="Only the first N rows of the shards.")
@click.option("--workers", default=0, show_default=True, type=int, help="Run tasks on a dask LocalCluster of N processes.")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler (multi-node).")
@click.option("--loader-workers", default=1, show_default=True, type=int, help="In-process: decode processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--repair", is_flag=True, help="Recompute the done tasks whose chunks are missing or do not decode.")
def command(repair: bool, **options: object) -> None:
    """Compute the base model's enhanced targets once and write them (with each view's box) to a store."""
    cfg = from_options(CacheConfig, options)
    require_writable(cfg.out)
    if not repair:
        require_readable_flags(cfg.out)
    else:
        damaged = reset_damaged_tasks(cfg.out)
        named = ", ".join(f"view {t.view} task {t.index}" for t in damaged[:20]) + (", ..." if len(damaged) > 20 else "")
        click.echo(f"repair: {len(damaged)} damaged task(s) to recompute" + (f": {named}" if damaged else ""))
    with write_errors(cfg.out, "finished tasks are kept — free space and rerun the same command to continue"):
        summary = cache_targets(cfg, progress=show_progress())
    click.echo(f"{summary['tasks_run']} of {summary['tasks_total']} tasks computed ({summary['images']} images, "
               f"{summary['img_s']:.0f} img/s) -> {cfg.out}")
