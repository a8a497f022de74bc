"""A progress line every N units for logs off a terminal (nohup, slurm), where tqdm bars are switched off."""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger(__name__)


def clock(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """Logs '<what>: done/total <unit> (p %), <rate> img/s, elapsed, ETA' about `lines` times over a run."""

    def __init__(self, what: str, total: int, unit: str, enabled: bool, lines: int = 20) -> None:
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.every = max(1, math.ceil(total / lines))
        self.done, self.images, self._start = 0, 0, time.perf_counter()

    def update(self, units: int, images: int) -> None:
        """`units` more of the total finished, covering `images` images."""
        self.done, self.images = self.done + units, self.images + images
        if not self.enabled or (self.done % self.every and self.done != self.total):
            return
        elapsed = time.perf_counter() - self._start
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        log.info("%s: %d/%d %s (%.0f %%), %.0f img/s, elapsed %s, ETA %s", self.what, self.done, self.total,
                 self.unit, 100 * self.done / max(self.total, 1), self.images / max(elapsed, 1e-9), clock(elapsed),
                 clock(eta))
