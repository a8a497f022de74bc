"""Timing helpers: device synchronisation, interleaved repetitions, medians of dicts of figures, quiet runs."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work, so a clock read after it counts that work (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """(fn(), wall seconds), device work included."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def interleaved(runs: Mapping[str, Callable[[], T]], reps: int) -> dict[str, list[T]]:
    """Each callable `reps` times, alternating, the order rotated every repetition.

    On a shared host the load changes over time; alternating the compared configurations (and rotating which
    goes first) makes such drift hit all of them alike instead of biasing the ratio.
    """
    names = list(runs)
    out: dict[str, list[T]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            out[name].append(runs[name]())
    return out


def median_of(results: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the numeric values over `results` (other values: the first one's)."""
    keys = results[0].keys()
    merged: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in results]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        merged[key] = statistics.median(values) if numeric else values[0]
    return merged


@contextlib.contextmanager
def quiet(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of the named loggers (e.g. the stages' per-run INFO lines) while the context is open."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)
