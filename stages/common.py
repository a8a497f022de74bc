"""Small pieces every stage shares: the run-directory options and the final line of the training commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

if TYPE_CHECKING:  # for the annotation only: importing the loop pulls in torch
    from tec_pipeline.train.loop import TrainResult


def run_dir_options(option: Callable[..., Decorator]) -> Decorator:
    """--overwrite, --init-from, --init-optimizer: what a training command does with its run directory
    (tec_pipeline/train/run_dir.py); `option` is the command's `config.option_factory`."""
    options = (
        option("--overwrite", is_flag=True, help="--out holds another run: remove its files first and start this one."),
        option("--init-from", type=click.Path(dir_okay=False),
               help="Start a new run (new --out, own schedule) from this checkpoint's weights."),
        option("--init-optimizer", is_flag=True, help="With --init-from: also take its optimizer state."),
    )

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(options):
            f = decorator(f)
        return f

    return wrap


def final_loss(result: TrainResult) -> str:
    """'final loss 0.1234': the loss of the last logged window (what metrics.csv's last row says), or 'n/a'
    when the run had no step left to take (resumed after its end)."""
    loss = result.last_metrics.get("loss")
    return f"final loss {'n/a' if loss is None else f'{loss:.4f}'}"
