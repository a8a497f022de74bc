"""Small pieces every stage shares: the progress switch (one policy, in tec_pipeline/logs.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from tec_pipeline.logs import progress_enabled


def show_progress() -> bool:
    """Progress bars on rank 0, on a terminal, unless TEC_NO_PROGRESS=1."""
    return progress_enabled()


def run_dir_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--overwrite, --init-from, --init-optimizer: what a training command does with its run directory
    (tec_pipeline/train/run_dir.py)."""
    options = (
        click.option("--overwrite", is_flag=True,
                     help="--out holds another run: remove its files first and start this one."),
        click.option("--init-from", default=None, type=click.Path(dir_okay=False),
                     help="Start a new run (new --out, own schedule) from this checkpoint's weights."),
        click.option("--init-optimizer", is_flag=True, help="With --init-from: also take its optimizer state."),
    )
    for option in reversed(options):
        f = option(f)
    return f
