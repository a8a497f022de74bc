"""Stage-1 writing: a bounded pool of writer threads encodes and writes tasks while the next batches run.

Encoding (numpy casts, quantisation) and Zarr's compression, CRC32C and file writes release the GIL, so a few
threads overlap them with the base model. The queue is bounded (threads + 1 tasks in flight): the device waits
on the writers only when it is full, and host memory stays at a few tasks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import numpy as np

from tec_pipeline.store.layout import Task
from tec_pipeline.store.target_store import TargetStore


class WriterPool:
    """`submit(task, result)` writes `result` (write_task's arrays) in a writer thread, then calls on_written."""

    def __init__(self, store: TargetStore, threads: int, on_written: Callable[[Task], None] = lambda t: None) -> None:
        self.store, self.on_written = store, on_written
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tec-writer")
        self._slots = threading.BoundedSemaphore(threads + 1)
        self._futures: list[Future[int]] = []

    def submit(self, task: Task, result: dict[str, np.ndarray]) -> None:
        """Queue one task's write; blocks while the queue is full; re-raises a failed earlier write."""
        self._raise_failed()
        self._slots.acquire()
        future = self._pool.submit(self._write, task, result)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _write(self, task: Task, result: dict[str, np.ndarray]) -> int:
        self.store.write_task(task, **result)
        self.on_written(task)
        return task.rows

    def _raise_failed(self) -> None:
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()

    def close(self) -> None:
        """Wait for every queued write (none is abandoned half-way), then re-raise the first failure."""
        self._pool.shutdown(wait=True)
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def __enter__(self) -> WriterPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is None:
            self.close()
        else:  # finish what is queued (finished tasks are kept), report the original error
            self._pool.shutdown(wait=True)
