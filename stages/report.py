"""`tec report RUN`: the report of a `make reproduce` run, or (--study) of a `make study` run."""

from __future__ import annotations

import click

from tec_pipeline.config import config_option
from tec_pipeline.repro.report import write_report
from tec_pipeline.repro.study_report import write_study_report


@click.command("report")
@config_option
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--views", default=2, show_default=True, type=click.IntRange(min=1), help="V of the target store.")
@click.option("--e1", default=10, show_default=True, type=click.IntRange(min=1), help="Base-model epochs.")
@click.option("--e2", default=10, show_default=True, type=click.IntRange(min=1), help="Student epochs.")
@click.option("--study", is_flag=True, help="RUN is a `make study` run (uses --e2 as its student epochs).")
def command(run: str, views: int, e1: int, e2: int, study: bool) -> None:
    """Write RUN/report.md with the results tables, figures and commands (and results.json)."""
    path = write_study_report(run, e2) if study else write_report(run, views, e1, e2)
    click.echo(f"report -> {path}")
