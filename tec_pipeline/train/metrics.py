"""Per-step metrics on rank 0: RUN/metrics.csv and TensorBoard event files under RUN/tensorboard; the per-epoch
log line off a terminal.

Columns: step (optimizer steps done), epoch (fractional), lr, every loss term the step returned ('loss' first),
img_per_s (images per second over all ranks) and data_wait (fraction of the step's wall time spent waiting for
the loader). On resume the rows past the checkpoint's step are dropped, so the file reads as one clean run.
TensorBoard gets the same values as scalars `train/<column>` (`tensorboard --logdir RUN`, as MAE users do).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

from tec_pipeline.progress import clock

log = logging.getLogger(__name__)

FIXED_HEAD = ("step", "epoch", "lr")
FIXED_TAIL = ("img_per_s", "data_wait")


class EpochLog:
    """One log line per finished epoch when no progress bar is shown (nohup, slurm, CI): the only sign of life
    a log file gets otherwise. Line: epoch, optimizer steps, loss, img/s of the last step, elapsed and ETA."""

    def __init__(self, epochs: int, steps_per_epoch: int, start_step: int, enabled: bool) -> None:
        self.epochs, self.steps_per_epoch, self.enabled = epochs, steps_per_epoch, enabled
        self._start, self._start_step = time.perf_counter(), start_step  # a resumed run times from its resume

    def epoch_done(self, epoch: int, step: int, row: dict[str, Any]) -> None:
        """`epoch` (0-based) just ended at optimizer step `step`; `row` holds the last step's metrics."""
        if not self.enabled:
            return
        total = self.epochs * self.steps_per_epoch
        elapsed = time.perf_counter() - self._start
        eta = elapsed / max(step - self._start_step, 1) * max(total - step, 0)
        log.info("epoch %d/%d: step %d/%d, loss %.4f, %.0f img/s, elapsed %s, ETA %s", epoch + 1, self.epochs,
                 step, total, row.get("loss", float("nan")), row.get("img_per_s", 0.0), clock(elapsed),
                 clock(eta))


def _tensorboard_writer(run_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # imported late: it costs ~1 s and only rank 0 needs it

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class MetricsLogger:
    """Appends one row per optimizer step to `run_dir/metrics.csv`; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.csv"
        self.enabled = enabled
        self._columns: list[str] | None = None
        self._file: Any = None
        self._writer: csv.DictWriter | None = None
        self._tb = None
        if not enabled:
            return
        if resume_step is None and self.path.exists():
            self.path.unlink()
        elif resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._tb = _tensorboard_writer(run_dir)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
            columns = list(rows[0].keys()) if rows else None
        kept = [r for r in rows if int(r["step"]) <= step]
        if columns is None:
            self.path.unlink()
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self._columns = columns

    def _open(self, row: dict[str, Any]) -> None:
        if self._columns is None:
            terms = sorted(k for k in row if k not in FIXED_HEAD + FIXED_TAIL)
            terms.sort(key=lambda k: k != "loss")  # stable: 'loss' first, the rest alphabetical
            self._columns = [*FIXED_HEAD, *terms, *FIXED_TAIL]
        new_file = not self.path.exists()
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns, extrasaction="ignore")
        if new_file:
            self._writer.writeheader()

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (keys: the CSV columns; loss terms are floats)."""
        if not self.enabled:
            return
        if self._writer is None:
            self._open(row)
        assert self._writer is not None and self._file is not None
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
