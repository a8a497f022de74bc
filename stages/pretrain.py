"""`tec pretrain`: stage 2, a TEC student from cached targets (or online, for comparison)."""

from __future__ import annotations

import click

from stages.common import final_loss, run_dir_options
from tec_pipeline.config import config_option, from_options, option_factory
from tec_pipeline.storage import storage_options_option
from tec_pipeline.train.loop import AMP_POLICIES
from tec_pipeline.train.pretrain import VIEW_POLICIES, PretrainConfig, run_pretrain

option = option_factory(PretrainConfig)


@click.command("pretrain")
@config_option
@storage_options_option
@option("--shards", required=True, type=click.Path(), help="Shard directory or URL (s3://bucket/prefix) with manifest.json.")
@option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics).")
@option("--targets", help="Target store from `tec cache-targets` (cached mode).")
@option("--base-model", help="Base-model checkpoint: online mode, targets computed per step.")
@option("--base-arch", help="Base architecture (preset or timm ViT name) when its checkpoint "
        "records none (online).")
@option("--model", help="Student: a preset or timm ViT name with the store's patch grid "
        "(default: the base model's sizes); the student is a plain ViT of that size.")
@option("--input-size", type=int, help="Student input size, same patch grid as the store "
        "(online mode: the base model's too; default: the model's own).")
@option("--decoder-depth", type=int, help="Shared TEC decoder blocks (default 2).")
@option("--decoder-dim", type=int, help="TEC decoder width (default: by student width, 512 for ViT-B).")
@option("--decoder-heads", type=int, help="TEC decoder heads (default: 16 for ViT-B).")
@option("--decoder-mlp-ratio", type=float, help="TEC decoder MLP ratio (default 4).")
@option("--epochs", type=int)
@option("--batch-size", type=int, help="Per-rank micro-batch.")
@option("--accum", type=int, help="Gradient accumulation steps.")
@option("--blr", type=float, help="lr = blr x effective batch / 256.")
@option("--min-lr", type=float)
@option("--warmup-epochs", type=float)
@option("--weight-decay", type=float)
@option("--mask-ratio", type=float)
@option("--att-tau", type=float, help="Attention-target temperature.")
@option("--topk", type=int, help="k attention rows (default: the store's).")
@option("--last-layers", type=int, help="Online mode: blocks averaged.")
@option("--view-policy", type=click.Choice(VIEW_POLICIES),
        help="cycle: view = epoch mod V; first: always view 0.")
@option("--views", type=int, help="Use only the store's first N views (default: all).")
@option("--masks-per-view", type=int, help="Student masks per loaded view.")
@option("--workers", type=int, help="Loader worker processes.")
@option("--shuffle-buffer", type=int,
        help="Rows each loader worker holds (compact) to shuffle; sets its memory, see README.")
@option("--seed", type=int)
@option("--view-seed", type=int,
        help="Online: seed of the views (default: --seed); cached: must equal the store's.")
@option("--log-every", type=int,
        help="Optimizer steps per loss reduction and metrics row (a NaN is seen within this many).")
@option("--amp", type=click.Choice(AMP_POLICIES),
        help="Autocast: auto (bf16 on CUDA, off on CPU), bf16, fp16 (GradScaler, CUDA only), none.")
@option("--save-every", type=int, help="Checkpoint every N optimizer steps.")
@option("--resume/--no-resume", help="Continue from OUT/checkpoint.pth.")
@run_dir_options(option)
@option("--allow-partial", is_flag=True, help="Train on the finished rows of an unfinished store.")
@option("--limit", type=int, help="Only the first N rows.")
@option("--device")
@option("--deterministic", is_flag=True, help="Deterministic algorithms (bit-exact resume on CPU).")
@option("--mlp-token/--no-mlp-token", help="MLP-enhanced CLS token.")
@option("--pred-att/--no-pred-att", help="Attention target and head.")
def command(**options: object) -> None:
    """Train a TEC student: --targets STORE (cached) or --base-model CKPT (online)."""
    cfg = from_options(PretrainConfig, options)
    result = run_pretrain(cfg)
    click.echo(f"{result.steps} optimizer steps, {result.epochs_done} epochs, {final_loss(result)} -> "
               f"{result.checkpoint}")
