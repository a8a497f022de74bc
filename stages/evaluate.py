"""`tec linprobe`, `tec knn`, `tec frozen-eval` (both from one feature extraction), `tec finetune`: evaluate an encoder checkpoint on labelled shards.

The JSON they write (--json FILE) is described in tec_pipeline/eval/report.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from stages.common import run_dir_options
from tec_pipeline.config import config_option, from_options, option_factory
from tec_pipeline.eval.finetune import FinetuneConfig
from tec_pipeline.eval.frozen import FrozenEvalConfig, evaluate_frozen
from tec_pipeline.eval.report import evaluation_record, write_json
from tec_pipeline.logs import progress_enabled
from tec_pipeline.outputs import require_writable
from tec_pipeline.storage import storage_options_option

frozen_option = option_factory(FrozenEvalConfig)
finetune_option = option_factory(FinetuneConfig)
# the method options, shared by the command of each method and by frozen-eval, which runs both
protocol_option = frozen_option("--protocol", type=click.Choice(["lbfgs", "mae"]),
                                help="lbfgs: L-BFGS on standardised features (fast, not comparable with published "
                                     "numbers); mae: MAE's BatchNorm + LARS head, 90 epochs.")
k_option = frozen_option("--k", type=int, help="kNN neighbours.")
temperature_option = frozen_option("--temperature", type=float, help="kNN vote weight exp(sim / T).")


def common_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options every evaluation shares, with the defaults of its config `cls`."""
    option = option_factory(cls)
    options = (
        config_option,
        storage_options_option,
        option("--checkpoint", required=True, help="Encoder checkpoint (ours, MAE release, iBOT/DINO, DINOv2 hub, "
               "timm, timm HF folder, safetensors)."),
        option("--arch", help="Architecture (preset or timm ViT name) when the checkpoint records none."),
        option("--input-size", type=int, help="Run the encoder at this size (default: its own)."),
        option("--train-shards", required=True, type=click.Path(), help="Labelled training shards (directory or URL)."),
        option("--test-shards", required=True, type=click.Path(), help="Labelled test shards (directory or URL)."),
        option("--json", "json", type=click.Path(dir_okay=False), help="Write the results here."),
        option("--limit-train", type=int, help="Only the first N training images."),
        option("--limit-test", type=int, help="Only the first N test images."),
        option("--seed", type=int),
        option("--batch-size", type=int),
    )

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(options):
            f = decorator(f)
        return f

    return wrap


def _finish(record: dict[str, Any], json_path: str | None) -> None:
    if json_path:
        write_json(record, json_path)
    click.echo(f"{record['method']} {record['arch']} ({record['n_train']} train / {record['n_test']} test): "
               f"top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%"
               + (f" [{record['pooling']} pooling]" if "pooling" in record else "")
               + (f" -> {json_path}" if json_path else ""))


def _frozen(methods: tuple[str, ...], options: dict[str, Any], json_paths: dict[str, str | None]) -> None:
    cfg = from_options(FrozenEvalConfig, options)
    for flag, path in json_paths.items():
        if path:
            require_writable(path, flag, file=True)  # before the features are computed, not after
    records = evaluate_frozen(methods, cfg, progress=progress_enabled())
    for method, path in zip(methods, json_paths.values(), strict=True):
        _finish(records[method], path)


@click.command("linprobe")
@common_options(FrozenEvalConfig)
@protocol_option
def linprobe_command(**options: Any) -> None:
    """Linear probe on frozen centre-view features (CLS and mean pooling; the better one is reported)."""
    _frozen(("linprobe",), options, {"--json": options["json"]})


@click.command("knn")
@common_options(FrozenEvalConfig)
@k_option
@temperature_option
def knn_command(**options: Any) -> None:
    """Weighted kNN (cosine, DINO's votes) on frozen centre-view features."""
    _frozen(("knn",), options, {"--json": options["json"]})


@click.command("frozen-eval")
@common_options(FrozenEvalConfig)
@protocol_option
@k_option
@temperature_option
@click.option("--json-prefix", default=None, type=click.Path(dir_okay=False),
              help="Write PREFIX-linprobe.json and PREFIX-knn.json (the files `tec linprobe` / `tec knn` write).")
@click.option("--export", default=None, type=click.Path(dir_okay=False),
              help="First write --checkpoint (with --arch) as timm weights to this .safetensors file, as `tec convert "
                   "CHECKPOINT --out FILE` does, then evaluate FILE: both commands in one process.")
def frozen_eval_command(json_prefix: str | None, export: str | None, **options: Any) -> None:
    """Linear probe and kNN from one feature extraction (about half the cost of running both commands)."""
    if options["json"]:
        raise click.BadParameter("use --json-prefix (one file per method)", param_hint="--json")
    paths = {f"--json-prefix ({m})": f"{json_prefix}-{m}.json" if json_prefix else None for m in ("linprobe", "knn")}
    if export:
        from stages.convert import export as export_encoder

        for flag, path in paths.items():
            if path:
                require_writable(path, flag, file=True)  # before the export, not after
        export_encoder(options["checkpoint"], export, options["arch"], None, "--export")
        options = {**options, "checkpoint": export, "arch": None}  # the file records its architecture
    _frozen(("linprobe", "knn"), options, paths)


@click.command("finetune")
@common_options(FinetuneConfig)
@finetune_option("--out", required=True, type=click.Path(file_okay=False), help="Run directory of the fine-tune.")
@finetune_option("--epochs", type=int)
@finetune_option("--accum", type=int)
@finetune_option("--blr", type=float, help="lr = blr x effective batch / 256.")
@finetune_option("--min-lr", type=float)
@finetune_option("--warmup-epochs", type=float)
@finetune_option("--weight-decay", type=float)
@finetune_option("--layer-decay", type=float)
@finetune_option("--drop-path", type=float)
@finetune_option("--clip-grad", type=float)
@finetune_option("--mixup", type=float, help="Mixup alpha (recipes: 0.8).")
@finetune_option("--cutmix", type=float, help="CutMix alpha (recipes: 1.0).")
@finetune_option("--smoothing", type=float, help="Label smoothing.")
@finetune_option("--aa", help="RandAugment policy ('' = none).")
@finetune_option("--reprob", type=float, help="Random-erasing probability.")
@finetune_option("--workers", type=int, help="Loader worker processes per rank.")
@finetune_option("--save-every", type=int)
@run_dir_options(finetune_option)
@finetune_option("--resume/--no-resume")
@finetune_option("--amp", type=click.Choice(("auto", "bf16", "fp16", "none")),
                 help="Autocast: auto (bf16 on CUDA, off on CPU), bf16, fp16 (GradScaler, CUDA only), none.")
def finetune_command(**options: Any) -> None:
    """Fine-tune the encoder end to end (layer decay, drop path, RandAugment, mixup) and score the test set."""
    from tec_pipeline.eval.features import check_input_size
    from tec_pipeline.eval.finetune import finetune
    from tec_pipeline.models.base import read_encoder_checkpoint
    from tec_pipeline.train.distributed import init_distributed, is_main_process

    cfg = from_options(FinetuneConfig, options)
    rank, world = init_distributed()
    encoder = read_encoder_checkpoint(cfg.checkpoint, cfg.arch, arch_flag="--arch", input_size=cfg.input_size)
    check_input_size(cfg.arch, encoder.arch, cfg.checkpoint, cfg.input_size)
    result = finetune(cfg, encoder, rank, world)
    if is_main_process():
        record = evaluation_record("finetune", encoder, result.pop("n_train"), result.pop("n_test"), cfg.seed, result)
        _finish(record, cfg.json)
