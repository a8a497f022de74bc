"""torchrun helpers: process-group set-up from environment variables and a few rank-aware collectives.

Every helper degrades to the single-process case when torch.distributed is not initialised, so library code
calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from tec_pipeline.devices import resolve_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise (the CPU path, also on a machine that has GPUs)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> tuple[int, int]:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK); return (rank, world).

    Without WORLD_SIZE > 1 nothing is initialised and (0, 1) is returned. The backend follows `device` (the
    `--device` value, resolved as the training loop resolves it): NCCL on CUDA, each process pinned to
    cuda:LOCAL_RANK so ranks never share GPU 0; gloo on CPU. Idempotent.
    """
    if is_distributed():
        return get_rank(), get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group(backend=backend_for(resolved), timeout=datetime.timedelta(minutes=timeout_minutes))
    return get_rank(), get_world_size()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over ranks (a copy; the input is untouched)."""
    out = values.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
