"""Small pieces every stage shares: progress switch and the conventional option set-up."""

from __future__ import annotations

import os
import sys


def show_progress() -> bool:
    """Progress bars on a terminal, unless TEC_NO_PROGRESS=1."""
    return os.environ.get("TEC_NO_PROGRESS", "0") != "1" and sys.stderr.isatty()
