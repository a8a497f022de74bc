"""`tec linprobe`, `tec knn`, `tec finetune`: evaluate an encoder checkpoint on labelled shards.

The JSON they write (--json FILE) is described in tec_pipeline/eval/report.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from stages.common import run_dir_options
from tec_pipeline.config import config_option, from_options
from tec_pipeline.eval.report import evaluation_record, write_json
from tec_pipeline.outputs import require_writable
from tec_pipeline.storage import storage_options_option

_COMMON = (
    click.option("--checkpoint", required=True, help="Encoder checkpoint (ours, MAE release, iBOT/DINO, DINOv2 hub, "
                 "timm, timm HF folder, safetensors)."),
    click.option("--arch", default=None, help="Architecture (preset or timm ViT name) when the checkpoint records none."),
    click.option("--input-size", default=None, type=int, help="Run the encoder at this size (default: its own)."),
    click.option("--train-shards", required=True, type=click.Path(), help="Labelled training shards (directory or URL)."),
    click.option("--test-shards", required=True, type=click.Path(), help="Labelled test shards (directory or URL)."),
    click.option("--json", "json", default=None, type=click.Path(dir_okay=False), help="Write the results here."),
    click.option("--limit-train", default=None, type=int, help="Only the first N training images."),
    click.option("--limit-test", default=None, type=int, help="Only the first N test images."),
    click.option("--seed", default=0, show_default=True, type=int),
)


def common_options(batch_size: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--batch-size", default=batch_size, show_default=True, type=int)(f)
        for option in reversed(_COMMON):
            f = option(f)
        return config_option(storage_options_option(f))
    return wrap


def _finish(record: dict[str, Any], json_path: str | None) -> None:
    if json_path:
        write_json(record, json_path)
    click.echo(f"{record['method']} {record['arch']} ({record['n_train']} train / {record['n_test']} test): "
               f"top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%"
               + (f" [{record['pooling']} pooling]" if "pooling" in record else "")
               + (f" -> {json_path}" if json_path else ""))


def _frozen(method: str, options: dict[str, Any]) -> None:
    from tec_pipeline.eval.frozen import FrozenEvalConfig, evaluate_frozen

    cfg = from_options(FrozenEvalConfig, options)
    if cfg.json:
        require_writable(cfg.json, "--json")  # before the features are computed, not after
    _finish(evaluate_frozen(method, cfg), cfg.json)


@click.command("linprobe")
@common_options(batch_size=256)
@click.option("--protocol", type=click.Choice(["lbfgs", "mae"]), default="lbfgs", show_default=True,
              help="lbfgs: L-BFGS on standardised features (fast, not comparable with published numbers); "
                   "mae: MAE's BatchNorm + LARS head, 90 epochs.")
def linprobe_command(**options: Any) -> None:
    """Linear probe on frozen centre-view features (CLS and mean pooling; the better one is reported)."""
    _frozen("linprobe", options)


@click.command("knn")
@common_options(batch_size=256)
@click.option("--k", default=20, show_default=True, type=int, help="Neighbours.")
@click.option("--temperature", default=0.07, show_default=True, type=float, help="Vote weight exp(sim / T).")
def knn_command(**options: Any) -> None:
    """Weighted kNN (cosine, DINO's votes) on frozen centre-view features."""
    _frozen("knn", options)


@click.command("finetune")
@common_options(batch_size=64)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory of the fine-tune.")
@click.option("--epochs", default=50, show_default=True, type=int)
@click.option("--accum", default=1, show_default=True, type=int)
@click.option("--blr", default=1e-3, show_default=True, type=float, help="lr = blr x effective batch / 256.")
@click.option("--min-lr", default=1e-6, show_default=True, type=float)
@click.option("--warmup-epochs", default=5.0, show_default=True, type=float)
@click.option("--weight-decay", default=0.05, show_default=True, type=float)
@click.option("--layer-decay", default=0.75, show_default=True, type=float)
@click.option("--drop-path", default=0.1, show_default=True, type=float)
@click.option("--clip-grad", default=None, type=float)
@click.option("--mixup", default=0.0, show_default=True, type=float, help="Mixup alpha (recipes: 0.8).")
@click.option("--cutmix", default=0.0, show_default=True, type=float, help="CutMix alpha (recipes: 1.0).")
@click.option("--smoothing", default=0.1, show_default=True, type=float, help="Label smoothing.")
@click.option("--aa", default="rand-m9-mstd0.5-inc1", show_default=True, help="RandAugment policy ('' = none).")
@click.option("--reprob", default=0.25, show_default=True, type=float, help="Random-erasing probability.")
@click.option("--workers", default=0, show_default=True, type=int, help="Loader worker processes per rank.")
@click.option("--save-every", default=0, show_default=True, type=int)
@run_dir_options
@click.option("--resume/--no-resume", default=True, show_default=True)
@click.option("--amp", default="auto", show_default=True, type=click.Choice(("auto", "bf16", "fp16", "none")),
              help="Autocast: auto (bf16 on CUDA, off on CPU), bf16, fp16 (GradScaler, CUDA only), none.")
def finetune_command(**options: Any) -> None:
    """Fine-tune the encoder end to end (layer decay, drop path, RandAugment, mixup) and score the test set."""
    from tec_pipeline.eval.features import check_input_size
    from tec_pipeline.eval.finetune import FinetuneConfig, finetune
    from tec_pipeline.models.base import read_encoder_checkpoint
    from tec_pipeline.train.distributed import init_distributed, is_main_process

    cfg = from_options(FinetuneConfig, options)
    rank, world = init_distributed()
    encoder = read_encoder_checkpoint(cfg.checkpoint, cfg.arch, arch_flag="--arch", input_size=cfg.input_size)
    check_input_size(cfg.arch, encoder.arch, cfg.checkpoint, cfg.input_size)
    result = finetune(cfg, encoder, rank, world)
    if is_main_process():
        record = evaluation_record("finetune", encoder, result.pop("n_train"), result.pop("n_test"), cfg.seed, result)
        _finish(record, options["json"])
