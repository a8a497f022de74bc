"""Devices: the one `--device` resolver, and CPU thread placement (compute threads must not share cores with
busy loader processes)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from tec_pipeline.errors import UserError


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def threads_beside_workers(device: torch.device, loader_workers: int) -> Iterator[None]:
    """On CPU with decode workers, run the model on the cores they leave: min(threads, cores − workers) ≥ 1.

    OpenMP threads that share cores with busy decode processes stall at every parallel region's barrier: on
    2 cores, 2 threads + 1 decode worker ran stage 1 at ~70 img/s, 1 thread + 1 worker at ~370 img/s
    (tec_micro_p4_28); training loops with loader workers behave alike. The previous thread count is restored
    afterwards. (The dask executor already computes with one thread per worker.)
    """
    previous = torch.get_num_threads()
    if device.type == "cpu" and loader_workers > 0:
        torch.set_num_threads(max(1, min(previous, available_cores() - loader_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda:LOCAL_RANK when CUDA is available, else cpu), `cpu` or `cuda[:N]`; UserError otherwise."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu or cuda[:N]") from None
    cuda_missing = device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    if device.type not in ("cpu", "cuda") or cuda_missing:
        raise UserError(f"--device {name} is not available here; use auto, cpu or cuda[:N] (with a GPU)")
    return device
