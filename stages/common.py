"""Small pieces every stage shares: the progress switch (one policy, in tec_pipeline/logs.py)."""

from __future__ import annotations

from tec_pipeline.logs import progress_enabled


def show_progress() -> bool:
    """Progress bars on rank 0, on a terminal, unless TEC_NO_PROGRESS=1."""
    return progress_enabled()
