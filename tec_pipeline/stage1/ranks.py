"""torchrun: every rank one device (LOCAL_RANK), the store created once by rank 0, one summary.

Coordination uses a gloo process group whatever the devices (a few small messages: the plan and a count).
Rank 0 creates or resumes the store and broadcasts either the pending chunk groups or its error, so the other
ranks never wait on a rank that has failed; each rank then takes `plan.rank_share` of the groups.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tec_pipeline.errors import UserError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 may resume (scan) a large store before it broadcasts


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def rank_device(name: str, ranks: Ranks) -> str:
    """`--device` for this rank: a bare 'cuda' (or 'auto' on CUDA) means this rank's GPU, cuda:LOCAL_RANK."""
    if ranks.world > 1 and name == "cuda":
        return f"cuda:{ranks.local_rank}"
    return name


@contextmanager
def coordination(ranks: Ranks) -> Iterator[None]:
    """A gloo process group for the run when there are several ranks (torchrun's env:// rendezvous)."""
    if ranks.world <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def from_main(ranks: Ranks, make: Callable[[], T]) -> T:
    """`make()` on rank 0, its result (or its UserError, raised on every rank) broadcast to all ranks."""
    if ranks.world <= 1:
        return make()
    box: list[Any] = [None]
    if ranks.is_main:
        try:
            box = [("ok", make())]
        except UserError as e:
            box = [("error", str(e))]
        except Exception as e:  # noqa: BLE001 — tell the other ranks, then fail here as usual
            dist.broadcast_object_list([("error", f"rank 0 failed: {e.__class__.__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def total(ranks: Ranks, value: int) -> int:
    """Sum of `value` over all ranks (after every rank has finished its share)."""
    if ranks.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())
