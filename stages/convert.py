"""`tec convert CKPT --out FILE.safetensors | --hf DIR`: any supported checkpoint → plain timm ViT weights
(wiring only)."""

from __future__ import annotations

import click

from tec_pipeline.config import config_option


@click.command("convert")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Output file (.safetensors): timm VisionTransformer weights plus their architecture.")
@click.option("--hf", default=None, type=click.Path(),
              help="Output folder in timm's Hugging Face layout (model.safetensors + config.json), for "
                   "timm.create_model('local-dir:DIR', pretrained=True).")
@click.option("--arch", default=None,
              help="Architecture (preset or timm ViT name) when the checkpoint records none, e.g. an MAE release.")
@click.option("--input-size", default=None, type=int, help="Export at this input size (pos_embed resampled by timm).")
@config_option
def command(checkpoint: str, out: str | None, hf: str | None, arch: str | None, input_size: int | None) -> None:
    """Export CHECKPOINT (TEC/MAE run, MAE release, iBOT/DINO, timm, safetensors) as timm ViT weights.

    The MLP CLS token is folded in, the final norm kept, adaptors and decoders dropped. --out FILE loads
    strictly with timm.create_model(timm_name, num_classes=0, **timm_kwargs) from the file's own metadata;
    --hf DIR with timm.create_model("local-dir:DIR", pretrained=True) (see docs/hf.md).
    """
    if (out is None) == (hf is None):
        raise click.UsageError("give one of --out FILE.safetensors or --hf DIR")
    if out:
        export(checkpoint, out, arch, input_size, "--out")
    else:
        export(checkpoint, hf, arch, input_size, "--hf", hf=True)


def export(checkpoint: str, target: str, arch: str | None, input_size: int | None, flag: str, hf: bool = False
           ) -> None:
    """`tec convert CHECKPOINT --out TARGET` (--hf TARGET when `hf`); `flag` names TARGET in errors. Also what
    `tec frozen-eval --export` runs before it evaluates the file."""
    from tec_pipeline.models.convert import convert_checkpoint, convert_to_hf
    from tec_pipeline.outputs import require_writable, write_errors

    require_writable(target, flag, file=not hf)
    with write_errors(target, "nothing was replaced (the output is written under a temporary name first)"):
        if hf:
            convert_to_hf(checkpoint, target, arch, input_size)
        else:
            convert_checkpoint(checkpoint, target, arch, input_size, flag)  # logs what it read and wrote
