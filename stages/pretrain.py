"""`tec pretrain`: stage 2, a TEC student from cached targets (or online, for comparison)."""

from __future__ import annotations

import click

from stages.common import run_dir_options
from tec_pipeline.config import config_option, from_options
from tec_pipeline.data.loader import DEFAULT_SHUFFLE_BUFFER
from tec_pipeline.storage import storage_options_option
from tec_pipeline.train.loop import AMP_POLICIES
from tec_pipeline.train.pretrain import VIEW_POLICIES, PretrainConfig, run_pretrain


@click.command("pretrain")
@config_option
@storage_options_option
@click.option("--shards", required=True, type=click.Path(), help="Shard directory or URL (s3://bucket/prefix) with manifest.json.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics).")
@click.option("--targets", default=None, help="Target store from `tec cache-targets` (cached mode).")
@click.option("--base-model", default=None, help="Base-model checkpoint: online mode, targets computed per step.")
@click.option("--base-arch", default=None, help="Base architecture (preset or timm ViT name) when its checkpoint "
              "records none (online).")
@click.option("--model", default=None, help="Student: a preset or timm ViT name with the store's patch grid "
              "(default: the base model's sizes); the student is a plain ViT of that size.")
@click.option("--input-size", default=None, type=int, help="Student input size, same patch grid as the store "
              "(online mode: the base model's too; default: the model's own).")
@click.option("--decoder-depth", default=None, type=int, help="Shared TEC decoder blocks (default 2).")
@click.option("--decoder-dim", default=None, type=int, help="TEC decoder width (default: by student width, 512 for ViT-B).")
@click.option("--decoder-heads", default=None, type=int, help="TEC decoder heads (default: 16 for ViT-B).")
@click.option("--decoder-mlp-ratio", default=None, type=float, help="TEC decoder MLP ratio (default 4).")
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int, help="Per-rank micro-batch.")
@click.option("--accum", default=1, show_default=True, type=int, help="Gradient accumulation steps.")
@click.option("--blr", default=1.5e-4, show_default=True, type=float, help="lr = blr x effective batch / 256.")
@click.option("--min-lr", default=0.0, show_default=True, type=float)
@click.option("--warmup-epochs", default=1.0, show_default=True, type=float)
@click.option("--weight-decay", default=0.05, show_default=True, type=float)
@click.option("--mask-ratio", default=0.75, show_default=True, type=float)
@click.option("--att-tau", default=1.8, show_default=True, type=float, help="Attention-target temperature.")
@click.option("--topk", default=None, type=int, help="k attention rows (default: the store's).")
@click.option("--last-layers", default=2, show_default=True, type=int, help="Online mode: blocks averaged.")
@click.option("--view-policy", default="cycle", show_default=True, type=click.Choice(VIEW_POLICIES),
              help="cycle: view = epoch mod V; first: always view 0.")
@click.option("--views", default=None, type=int, help="Use only the store's first N views (default: all).")
@click.option("--masks-per-view", default=1, show_default=True, type=int, help="Student masks per loaded view.")
@click.option("--workers", default=0, show_default=True, type=int, help="Loader worker processes.")
@click.option("--shuffle-buffer", default=DEFAULT_SHUFFLE_BUFFER, show_default=True, type=int,
              help="Rows each loader worker holds (compact) to shuffle; sets its memory, see README.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--view-seed", default=None, type=int,
              help="Online: seed of the views (default: --seed); cached: must equal the store's.")
@click.option("--log-every", default=10, show_default=True, type=int,
              help="Optimizer steps per loss reduction and metrics row (a NaN is seen within this many).")
@click.option("--amp", default="auto", show_default=True, type=click.Choice(AMP_POLICIES),
              help="Autocast: auto (bf16 on CUDA, off on CPU), bf16, fp16 (GradScaler, CUDA only), none.")
@click.option("--save-every", default=0, show_default=True, type=int, help="Checkpoint every N optimizer steps.")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from OUT/checkpoint.pth.")
@run_dir_options
@click.option("--allow-partial", is_flag=True, help="Train on the finished rows of an unfinished store.")
@click.option("--limit", default=None, type=int, help="Only the first N rows.")
@click.option("--device", default="auto", show_default=True)
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms (bit-exact resume on CPU).")
@click.option("--mlp-token/--no-mlp-token", default=True, show_default=True, help="MLP-enhanced CLS token.")
@click.option("--pred-att/--no-pred-att", default=True, show_default=True, help="Attention target and head.")
def command(**options: object) -> None:
    """Train a TEC student: --targets STORE (cached) or --base-model CKPT (online)."""
    cfg = from_options(PretrainConfig, options)
    result = run_pretrain(cfg)
    click.echo(f"{result.steps} optimizer steps, {result.epochs_done} epochs -> {result.checkpoint}")
