"""Stage 1's decode ring: decode processes fill pixel slots made once, and hand each group over row by row.

Why not a torch DataLoader (the previous executor): it sends every decoded chunk group as a new shared-memory
tensor, allocated, faulted in and freed per group (~0.1 ms per ViT-B view in the worker, page faults in the
main process); on CUDA it copies each group once more into pinned memory (77 MB per ViT-B group at V = 2); and
it delivers a group only when all of it is decoded, so the device waits for a whole group before its first
batch. Here the slots are allocated once and shared with the workers (on CUDA, page-locked in place with
`cudaHostRegister`, so `non_blocking` copies read them directly); a worker reports every `every` rows, and
the device starts on a group's first batch while the rest of it decodes.

A group is admitted (claimed) in the main process just before it is sent to a worker, as before; a slot is
reused only after the consumer has finished the group it held (compute_task has synchronised its copies).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import signal
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from tec_pipeline.data.shards import Manifest
from tec_pipeline.stage1.decode import TaskInputs, decode_rows_into, decode_tasks
from tec_pipeline.store.layout import Task

log = logging.getLogger(__name__)

_POLL_S = 1.0  # how often a waiting side looks whether the other side is still alive
_AHEAD = 2  # groups in flight per worker besides the one being computed (DataLoader's prefetch_factor)


@dataclass(frozen=True)
class DecodeJob:
    """What every decode worker needs besides its jobs: the groups and how to decode them."""

    shards: str
    manifest: Manifest
    groups: list[list[Task]]
    seed: int
    img_size: int
    replay: str
    every: int


@dataclass(frozen=True)
class _Slot:
    """One group's buffers in shared memory: pixels uint8 [V, R, 3, S, S], boxes int32 [V, R, 5], valid [R]."""

    pixels: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def allocate(cls, views: int, rows: int, img_size: int) -> _Slot:
        return cls(torch.empty((views, rows, 3, img_size, img_size), dtype=torch.uint8).share_memory_(),
                   torch.zeros((views, rows, 5), dtype=torch.int32).share_memory_(),
                   torch.zeros(rows, dtype=torch.bool).share_memory_())

    def views(self, tasks: list[Task]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        n = tasks[0].rows
        return self.pixels[:len(tasks), :n], self.boxes[:len(tasks), :n].numpy(), self.valid[:n].numpy()


class WorkerFailed(RuntimeError):
    """A decode worker exited without reporting (killed, out of memory)."""


def _decode_worker(jobs: Any, results: Any, slots: list[_Slot], job: DecodeJob, parent: int) -> None:
    """Decode the groups named by `jobs` ((ticket, group index, slot) or None to stop) into their slots,
    reporting (ticket, rows done, None) as rows become final and (ticket, -1, error) on failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it stops us
    torch.set_num_threads(1)  # one process per core: intra-op threads would only contend (as in DataLoader)
    while True:
        try:
            message = jobs.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone (SIGKILL): do not outlive it
                return
            continue
        if message is None:
            return
        ticket, index, slot = message
        tasks = job.groups[index]
        try:
            decode_rows_into(*slots[slot].views(tasks), job.shards, job.manifest, tasks, job.seed, job.replay,
                             on_rows=lambda done, t=ticket: results.put((t, done, None)), every=job.every)
        except Exception as error:  # reported to the main process, which raises it; the worker goes on
            results.put((ticket, -1, _picklable(error)))


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class DecodeRing:
    """Iterate the admitted groups' inputs (one TaskInputs per task) as `workers` processes decode them ahead.

    Use as a context manager: leaving it stops the workers and releases the slots. With `workers == 0` the
    groups are decoded in this process, one at a time. `pin`: page-lock the slots for the device (CUDA).
    Each TaskInputs' `wait_rows(n)` returns once rows [0, n) of it are decoded; a worker's error is raised there.
    """

    def __init__(self, job: DecodeJob, workers: int, pin: bool,
                 admit: Callable[[int], bool] = lambda i: True) -> None:
        self.job, self.admit = job, admit
        self._done: dict[int, int] = {}  # ticket -> rows of its group decoded so far
        self._slots: list[_Slot] = []
        self._procs: list[Any] = []
        self._pinned: list[int] = []
        if workers and job.groups:
            views = max(len(g) for g in job.groups)
            rows = max(g[0].rows for g in job.groups)
            count = min(len(job.groups), workers * _AHEAD + 1)
            self._slots = [_Slot.allocate(views, rows, job.img_size) for _ in range(count)]
            ctx = mp.get_context()
            self._jobs, self._results = ctx.Queue(), ctx.Queue()
            self._procs = [ctx.Process(target=_decode_worker, daemon=True, name=f"tec-decode-{i}",
                                       args=(self._jobs, self._results, self._slots, job, os.getpid()))
                           for i in range(min(workers, len(job.groups)))]
            try:
                for proc in self._procs:
                    proc.start()
                if pin:  # after the fork: drivers may mark page-locked ranges MADV_DONTFORK (no mapping in a child)
                    self._pin_slots()
            except BaseException:  # no `with` block will close what was started
                self.close()
                raise

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def _pin_slots(self) -> None:
        cudart = torch.cuda.cudart()
        for slot in self._slots:
            ptr, size = slot.pixels.data_ptr(), slot.pixels.numel()
            code = int(cudart.cudaHostRegister(ptr, size, 0))
            if code != 0:  # still correct, only the copies to the device are synchronous
                log.warning("could not page-lock stage 1's pixel buffers (cudaError %d); copying from pageable "
                            "memory", code)
                return
            self._pinned.append(ptr)

    def __iter__(self) -> Iterator[list[TaskInputs]]:
        job, admitted = self.job, (i for i in range(len(self.job.groups)) if self.admit(i))
        if not self._procs:
            for i in admitted:
                yield decode_tasks(job.shards, job.manifest, job.groups[i], job.seed, job.img_size, job.replay)
            return
        tickets, free, in_flight = itertools.count(), list(range(len(self._slots))), deque[tuple[int, int, int]]()

        def dispatch() -> None:
            while free and (index := next(admitted, None)) is not None:
                ticket, slot = next(tickets), free.pop()
                self._done[ticket] = 0
                self._jobs.put((ticket, index, slot))
                in_flight.append((ticket, index, slot))

        dispatch()
        while in_flight:
            ticket, index, slot = in_flight.popleft()
            tasks = job.groups[index]
            pixels, boxes, valid = self._slots[slot].views(tasks)
            wait = partial(self._wait, ticket)
            yield [TaskInputs(task, pixels[j], boxes[j], valid, wait) for j, task in enumerate(tasks)]
            wait(tasks[0].rows)  # the consumer has finished with the group: its slot may be refilled
            del self._done[ticket]
            free.append(slot)
            dispatch()

    def _wait(self, ticket: int, rows: int) -> None:
        while self._done[ticket] < rows:
            try:
                done_ticket, done, error = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead:
                    raise WorkerFailed(f"stage-1 decode worker {dead[0].name} (pid {dead[0].pid}) exited "
                                       f"unexpectedly with code {dead[0].exitcode}; rerun to continue") from None
                continue
            if error is not None:
                raise error
            self._done[done_ticket] = done  # one worker decodes a group and reports its rows in order

    def close(self) -> None:
        """Stop the workers (at once: a group being decoded is abandoned) and release the slots."""
        for proc in self._procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            if proc.pid is not None:
                proc.join(timeout=5)
        if self._procs:
            self._jobs.cancel_join_thread()
            self._jobs.close()
            self._results.close()
        self._procs = []
        cudart = torch.cuda.cudart() if self._pinned else None
        for ptr in self._pinned:
            cudart.cudaHostUnregister(ptr)
        self._pinned, self._slots = [], []

    def __enter__(self) -> DecodeRing:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
