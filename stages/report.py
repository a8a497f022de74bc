"""`tec report RUN`: the reproduction report from what `make reproduce` left in RUN."""

from __future__ import annotations

import click

from tec_pipeline.config import config_option
from tec_pipeline.repro.ablation import write_ablation_report
from tec_pipeline.repro.report import write_report


@click.command("report")
@config_option
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--views", default=2, show_default=True, type=click.IntRange(min=1), help="V of the target store.")
@click.option("--e1", default=10, show_default=True, type=click.IntRange(min=1), help="Base-model epochs.")
@click.option("--e2", default=10, show_default=True, type=click.IntRange(min=1), help="Student epochs.")
@click.option("--ablation", is_flag=True, help="RUN is a `make ablate-views` run (uses --e2 as its epochs).")
def command(run: str, views: int, e1: int, e2: int, ablation: bool) -> None:
    """Write RUN/report.md with the results table, loss curves, accuracy chart, commands and configs."""
    path = write_ablation_report(run, e2) if ablation else write_report(run, views, e1, e2)
    click.echo(f"report -> {path}")
