"""`tec cache-targets`: stage 1, the frozen base model once over V views of every image -> Zarr target store."""

from __future__ import annotations

import click

from tec_pipeline.config import config_option, from_options, option_factory
from tec_pipeline.data.views import REPLAYS
from tec_pipeline.logs import progress_enabled
from tec_pipeline.outputs import require_writable
from tec_pipeline.stage1 import CacheConfig, cache_targets
from tec_pipeline.stage1.config import QUANTIZE_CHOICES
from tec_pipeline.storage import storage_options_option
from tec_pipeline.store.codecs import CODECS
from tec_pipeline.store.integrity import require_readable_flags, reset_damaged_tasks

option = option_factory(CacheConfig)


@click.command("cache-targets")
@config_option
@storage_options_option
@option("--shards", required=True, type=click.Path(), help="Shard directory or URL (s3://bucket/prefix) with manifest.json.")
@option("--base-model", required=True, help="Base-model checkpoint (MAE, iBOT/DINO, DINOv2 hub, timm, timm HF folder, safetensors, ours).")
@option("--out", required=True, help="Store path or fsspec URL (e.g. store.zarr, file:///..., memory://x).")
@option("--base-arch", help="Architecture when the checkpoint records none: a preset or any timm "
        "ViT name (e.g. vit_base_patch16_224, vit_small_patch14_reg4_dinov2).")
@option("--input-size", type=int, help="Input size the base model runs at (pos_embed resampled "
        "by timm; default: the architecture's own).")
@option("--views", type=int, help="Views per image (V).")
@option("--topk", type=int, help="k: patch-query attention rows kept.")
@option("--last-layers", type=int, help="Last blocks averaged into the feature target.")
@option("--codec", type=click.Choice(list(CODECS)), help="Feature encoding (see README).")
@option("--chunk-rows", type=int, help="Rows per chunk = rows per task.")
@option("--batch-size", type=int, help="Base-model batch size.")
@option("--seed", type=int, help="View seed: boxes come from (seed, row, view).")
@option("--limit", type=int, help="Only the first N rows of the shards.")
@option("--workers", type=int, help="Run tasks on a dask LocalCluster of N processes.")
@option("--scheduler", help="Address of an existing dask scheduler (multi-node).")
@option("--loader-workers", type=int, help="In-process: decode processes.")
@option("--device", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK).")
@option("--amp", type=click.Choice(["auto", "bf16", "fp16", "none"]),
        help="Base-model autocast: auto = bf16 on CUDA, none on CPU. Recorded in the store.")
@option("--writer-threads", type=int, help="Threads that encode and write chunks while the next batches run.")
@option("--replay", type=click.Choice(list(REPLAYS)), help="How a view's pixels are made from its box: pil (the "
        "reference pipeline's) or torch (same bicubic antialias filter, ~3x cheaper on the host). Recorded.")
@option("--quantize-on", type=click.Choice(list(QUANTIZE_CHOICES)), help="Where int8/ecq targets are quantised: "
        "auto = on the GPU (a quarter of the bytes cross back), on a CPU in the writer threads. The same bytes.")
@click.option("--repair", is_flag=True, help="Recompute the done tasks whose chunks are missing or do not decode.")
def command(repair: bool, **options: object) -> None:
    """Compute the base model's enhanced targets once and write them (with each view's box) to a store."""
    cfg = from_options(CacheConfig, options)
    if repair:
        require_writable(cfg.out)  # repair resets flags before stage 1 runs its own checks
        damaged = reset_damaged_tasks(cfg.out)
        named = ", ".join(f"view {t.view} task {t.index}" for t in damaged[:20]) + (", ..." if len(damaged) > 20 else "")
        click.echo(f"repair: {len(damaged)} damaged task(s) to recompute" + (f": {named}" if damaged else ""))
    else:
        require_readable_flags(cfg.out)
    summary = cache_targets(cfg, progress=progress_enabled())
    if summary["rank"] != 0:
        return  # one summary per run, from rank 0 (its counts cover every rank)
    left = summary["tasks_left_to_other_writers"]
    click.echo(f"{summary['tasks_run']} of {summary['tasks_total']} tasks computed ({summary['images']} images, "
               f"{summary['img_s']:.0f} img/s) -> {cfg.out}"
               + (f"; {left} left to another writer holding them" if left else ""))
