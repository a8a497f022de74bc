"""A `tec` command in a child process that reports its own peak RSS; imports nothing heavy itself.

Run as `python -c "from tec_pipeline.bench.child import main; main()" OUT tec-args...`: the command's module
is imported, the peak resident set size so far is noted ('imports_mb'), the command runs as `tec tec-args`,
then {'imports_mb', 'peak_mb'} is written to OUT as JSON, also after `--help` or a failure (the parent checks
the exit code). VmHWM of /proc/self/status is the high-water mark of this process's own
address space; the kernel's `ru_maxrss` of a child is not used, as it also counts the parent's resident set
at the fork.
"""

from __future__ import annotations

import importlib
import json
import re
import resource
import sys
from pathlib import Path

COMMAND = "from tec_pipeline.bench.child import main; main()"


def own_peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM on Linux, else ru_maxrss (KiB on Linux/BSD, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024 / 1e6
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def main() -> None:
    import cli

    out, argv = sys.argv[1], sys.argv[2:]
    module = cli.COMMANDS.get(argv[0], "cli").partition(":")[0] if argv else "cli"
    importlib.import_module(module)  # what the command loads before it does any work
    imports = own_peak_rss_mb()
    try:
        cli.main(argv)
    finally:
        Path(out).write_text(json.dumps({"imports_mb": imports, "peak_mb": own_peak_rss_mb()}))
