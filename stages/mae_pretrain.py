"""`tec mae-pretrain`: train a plain MAE base model from scratch on shards (for when none can be downloaded)."""

from __future__ import annotations

import click

from stages.common import run_dir_options
from tec_pipeline.config import config_option, from_options
from tec_pipeline.storage import storage_options_option
from tec_pipeline.train.distributed import init_distributed, is_main_process
from tec_pipeline.train.mae_pretrain import MAEPretrainConfig, pretrain_mae


@click.command("mae-pretrain")
@config_option
@storage_options_option
@click.option("--shards", required=True, type=click.Path(), help="Shard directory or URL (s3://bucket/prefix) with manifest.json.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics).")
@click.option("--model", default=MAEPretrainConfig.model, show_default=True, help="Encoder architecture preset.")
@click.option("--epochs", default=MAEPretrainConfig.epochs, show_default=True, type=int)
@click.option("--batch-size", default=MAEPretrainConfig.batch_size, show_default=True, type=int,
              help="Images per micro-batch per rank.")
@click.option("--accum", default=1, show_default=True, type=int, help="Gradient-accumulation micro-batches.")
@click.option("--blr", default=MAEPretrainConfig.blr, show_default=True, type=float,
              help="Base lr; lr = blr x effective batch / 256.")
@click.option("--min-lr", default=0.0, show_default=True, type=float, help="Floor of the cosine schedule.")
@click.option("--warmup-epochs", default=MAEPretrainConfig.warmup_epochs, show_default=True, type=float)
@click.option("--weight-decay", default=0.05, show_default=True, type=float)
@click.option("--mask-ratio", default=0.75, show_default=True, type=float)
@click.option("--decoder-depth", default=None, type=int, help="Decoder blocks [default: 8 for ViT-B+, 4 below].")
@click.option("--clip-grad", default=None, type=float, help="Clip the gradient norm to this value.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--save-every", default=0, show_default=True, type=int,
              help="Optimizer steps between mid-epoch checkpoints (0: epoch ends only).")
@click.option("--workers", default=0, show_default=True, type=int, help="Loader worker processes per rank.")
@click.option("--limit", default=None, type=int, help="Only the first N images of the shards.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUT/checkpoint.pth when it exists.")
@run_dir_options
@click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "none"]),
              help="Autocast: auto = bf16 on CUDA, off on CPU.")
@click.option("--deterministic", is_flag=True, help="Deterministic kernels (resume reproduces a run exactly).")
def command(**options: object) -> None:
    """Train a plain MAE (75 % masking, per-patch normalised pixel loss) whose checkpoints cache-targets reads."""
    cfg = from_options(MAEPretrainConfig, options)
    rank, world = init_distributed()
    result = pretrain_mae(cfg, rank, world)
    if is_main_process():
        loss = result.last_metrics.get("loss")
        click.echo(f"MAE {cfg.model}: {result.steps} steps, final loss "
                   f"{'n/a' if loss is None else f'{loss:.4f}'} -> {result.checkpoint}")
