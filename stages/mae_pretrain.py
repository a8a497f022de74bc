"""`tec mae-pretrain`: train a plain MAE base model from scratch on shards (for when none can be downloaded)."""

from __future__ import annotations

import click

from stages.common import final_loss, run_dir_options
from tec_pipeline.config import config_option, from_options, option_factory
from tec_pipeline.storage import storage_options_option
from tec_pipeline.train.distributed import init_distributed, is_main_process
from tec_pipeline.train.mae_pretrain import MAEPretrainConfig, pretrain_mae

option = option_factory(MAEPretrainConfig)


@click.command("mae-pretrain")
@config_option
@storage_options_option
@option("--shards", required=True, type=click.Path(), help="Shard directory or URL (s3://bucket/prefix) with manifest.json.")
@option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics).")
@option("--model", help="Encoder architecture preset.")
@option("--epochs", type=int)
@option("--batch-size", type=int, help="Images per micro-batch per rank.")
@option("--accum", type=int, help="Gradient-accumulation micro-batches.")
@option("--blr", type=float, help="Base lr; lr = blr x effective batch / 256.")
@option("--min-lr", type=float, help="Floor of the cosine schedule.")
@option("--warmup-epochs", type=float)
@option("--weight-decay", type=float)
@option("--mask-ratio", type=float)
@option("--decoder-depth", type=int, help="Decoder blocks [default: 8 for ViT-B+, 4 below].")
@option("--norm-pix-loss/--no-norm-pix-loss", help="Normalise each target patch (MAE's norm_pix_loss).")
@option("--clip-grad", type=float, help="Clip the gradient norm to this value.")
@option("--seed", type=int)
@option("--save-every", type=int, help="Optimizer steps between mid-epoch checkpoints (0: epoch ends only).")
@option("--workers", type=int, help="Loader worker processes per rank.")
@option("--limit", type=int, help="Only the first N images of the shards.")
@option("--resume/--no-resume", help="Continue from OUT/checkpoint.pth when it exists.")
@run_dir_options(option)
@option("--amp", type=click.Choice(["auto", "bf16", "fp16", "none"]), help="Autocast: auto = bf16 on CUDA, off on CPU.")
@option("--deterministic", is_flag=True, help="Deterministic kernels (resume reproduces a run exactly).")
def command(**options: object) -> None:
    """Train a plain MAE (75 % masking, per-patch normalised pixel loss) whose checkpoints cache-targets reads."""
    cfg = from_options(MAEPretrainConfig, options)
    rank, world = init_distributed()
    result = pretrain_mae(cfg, rank, world)
    if is_main_process():
        click.echo(f"MAE {cfg.model}: {result.steps} steps, {final_loss(result)} -> {result.checkpoint}")
