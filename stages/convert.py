"""`tec convert CKPT --out FILE.safetensors`: any supported checkpoint → plain timm ViT weights (wiring only)."""

from __future__ import annotations

import click

from tec_pipeline.config import config_option


@click.command("convert")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output file (.safetensors): timm VisionTransformer weights plus their architecture.")
@click.option("--arch", default=None,
              help="Architecture (preset or timm ViT name) when the checkpoint records none, e.g. an MAE release.")
@config_option
def command(checkpoint: str, out: str, arch: str | None) -> None:
    """Export CHECKPOINT (TEC/MAE run, MAE release, iBOT/DINO, timm, safetensors) as timm ViT safetensors.

    The MLP CLS token is folded in, the final norm kept, adaptors and decoders dropped. The result loads
    strictly with timm.create_model(timm_name, num_classes=0, **timm_kwargs) from the file's own metadata.
    """
    from tec_pipeline.models.convert import convert_checkpoint
    from tec_pipeline.outputs import require_writable, write_errors

    require_writable(out)
    with write_errors(out, "nothing was replaced (the file is written to a temporary name first)"):
        convert_checkpoint(checkpoint, out, arch)  # logs what it read and what it wrote
