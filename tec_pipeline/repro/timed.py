"""`python -m tec_pipeline.repro.timed DIR NAME -- COMMAND...`: run one step of `make reproduce` / `make study`
and record what it cost: DIR/NAME.ms (wall milliseconds) and DIR/NAME.cpu (CPU seconds, user + system, of the
command and every process it waited for, such as loader workers).

CPU seconds are the cost figure the reports use: on a shared host another job stretches the wall time of a step
but hardly its CPU time. The files are written only when the command succeeds, so a failed step leaves no cost
behind and make reruns it. Standard library only: the wrapper must not add torch's import time to the step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_timed(directory: Path, name: str, argv: list[str]) -> int:
    """Run argv; on success write NAME.ms and NAME.cpu under `directory`. Returns the command's exit status."""
    start = time.monotonic()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall_ms = round((time.monotonic() - start) * 1000)
    if proc.returncode == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.ms").write_text(f"{wall_ms}\n")
        (directory / f"{name}.cpu").write_text(f"{usage.ru_utime + usage.ru_stime:.2f}\n")
    return proc.returncode


def main(args: list[str]) -> int:
    if len(args) < 4 or args[2] != "--":
        print("usage: python -m tec_pipeline.repro.timed DIR NAME -- COMMAND...", file=sys.stderr)
        return 2
    return run_timed(Path(args[0]), args[1], args[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
