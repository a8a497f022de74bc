"""Small pieces every stage shares: the run-directory options of the training commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


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
