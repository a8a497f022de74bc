"""Logging and progress policy for every command: who logs, at what level, and when a progress bar shows.

- Under torchrun only rank 0 logs at INFO; the other ranks log warnings and errors only (RANK from torchrun's
  environment, read before any process group exists, so the rule holds from the first line).
- `-v` turns on DEBUG for this project's own loggers, not for chatty libraries: PIL logs every PNG chunk it
  parses and dask.distributed logs ~30 INFO lines for a LocalCluster start; both stay at WARNING.
- Progress bars only on rank 0, on a terminal, and not when TEC_NO_PROGRESS=1 (tests and CI set it).
"""

from __future__ import annotations

import logging
import os
import sys

# Libraries whose INFO/DEBUG lines drown our own; they still report warnings and errors.
QUIET_LIBRARIES = ("PIL", "distributed", "asyncio", "fsspec", "urllib3", "matplotlib", "numcodecs", "zarr",
                   "torch.distributed", "tornado", "bokeh", "botocore", "aiobotocore", "boto3", "s3fs")


def process_rank() -> int:
    """This process's global rank under torchrun (RANK), 0 outside it."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    return process_rank() == 0


def configure_logging(verbose: bool = False) -> None:
    """Root handler with plain messages; INFO (DEBUG with -v) on rank 0, WARNING on the other ranks."""
    level = (logging.DEBUG if verbose else logging.INFO) if is_main_process() else logging.WARNING
    logging.basicConfig(format="%(message)s")  # a no-op when a handler exists (a second in-process call)
    logging.getLogger().setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def progress_enabled(is_main: bool | None = None) -> bool:
    """tqdm bars on the main process only (`is_main`, default: rank 0), on a terminal, unless TEC_NO_PROGRESS=1."""
    main = is_main_process() if is_main is None else is_main
    return main and sys.stderr.isatty() and os.environ.get("TEC_NO_PROGRESS", "0") != "1"
