"""Stage-1 decoding: read a chunk's images once and replay every pending view of it (uint8, host memory).

Runs in the decode ring's worker processes (in-process executor and torchrun ranks) and dask workers; the pixels
stay uint8 until they are on the device (4x fewer bytes to copy than float32). With the torch replay, clean
JPEGs are decoded by simplejpeg into arrays (data/jpeg.py), the largest single saving of the host path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tec_pipeline.data.jpeg import decode_for_replay, image_size
from tec_pipeline.data.shards import Manifest, iter_fields
from tec_pipeline.data.views import DEFAULT_REPLAY, replay_source, replay_view_into, sample_view
from tec_pipeline.store.layout import Task


@dataclass(frozen=True)
class TaskInputs:
    """Decoded views of one task: pixels uint8 [n,3,S,S], boxes int32 [n,5], valid bool [n].

    `wait_rows(n)` returns once rows [0, n) are final (the decode ring hands a group over while its later rows
    still decode; read a row's pixels, box or validity only after waiting for it). Buffers may be reused once
    the task is computed: keep copies, not views.
    """

    task: Task
    pixels: torch.Tensor
    boxes: np.ndarray
    valid: np.ndarray
    wait_rows: Callable[[int], None] = lambda rows: None


def decode_tasks(shards_dir: str, manifest: Manifest, tasks: list[Task], seed: int, img_size: int,
                 replay: str = DEFAULT_REPLAY) -> list[TaskInputs]:
    """Tasks of one chunk (same rows, any views): read and decode each image once, then sample and replay every
    task's view box on it with `replay`. Returns one TaskInputs per task, in the order given."""
    pixels, boxes, valid = _task_buffers(tasks, img_size)
    decode_rows_into(pixels, boxes, valid, shards_dir, manifest, tasks, seed, replay)
    return [TaskInputs(task, pixels[j], boxes[j], valid.copy()) for j, task in enumerate(tasks)]


def decode_tasks_in_background(shards_dir: str, manifest: Manifest, tasks: list[Task], seed: int, img_size: int,
                               replay: str = DEFAULT_REPLAY, every: int = 64) -> list[TaskInputs]:
    """`decode_tasks`, returned at once: a thread decodes, and each TaskInputs' `wait_rows(n)` blocks until
    rows [0, n) are decoded (re-raising the thread's error), so the device starts on the first batch while the
    rest decode (the dask executor; decoding releases the GIL: Pillow, simplejpeg and torch's resize)."""
    pixels, boxes, valid = _task_buffers(tasks, img_size)
    progress = _Progress()
    threading.Thread(target=progress.run, daemon=True, name="tec-decode", args=(
        lambda: decode_rows_into(pixels, boxes, valid, shards_dir, manifest, tasks, seed, replay,
                                 progress.advance, every),)).start()
    return [TaskInputs(task, pixels[j], boxes[j], valid, progress.wait) for j, task in enumerate(tasks)]


class _Progress:
    """Rows decoded so far by a background thread, or its error."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._done, self._error = 0, None

    def run(self, decode: Callable[[], None]) -> None:
        try:
            decode()
        except BaseException as error:  # raised to the waiting consumer instead
            with self._changed:
                self._error = error
                self._changed.notify_all()

    def advance(self, done: int) -> None:
        with self._changed:
            self._done = done
            self._changed.notify_all()

    def wait(self, rows: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._done >= rows or self._error is not None)
            if self._error is not None:
                raise self._error


def _task_buffers(tasks: list[Task], img_size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Fresh pixels [len(tasks), n, 3, S, S], boxes and valid for one chunk's tasks (decode_rows_into writes
    every row, so the pixels need no zeroing)."""
    n = _shared_rows(tasks)
    return (torch.empty((len(tasks), n, 3, img_size, img_size), dtype=torch.uint8),
            np.zeros((len(tasks), n, 5), dtype=np.int32), np.zeros(n, dtype=bool))


def _shared_rows(tasks: list[Task]) -> int:
    if any((t.row_start, t.row_stop) != (tasks[0].row_start, tasks[0].row_stop) for t in tasks):
        raise ValueError(f"tasks of different row ranges cannot share a decode: {tasks}")
    return tasks[0].rows


def decode_rows_into(pixels: torch.Tensor, boxes: np.ndarray, valid: np.ndarray, shards_dir: str,
                     manifest: Manifest, tasks: list[Task], seed: int, replay: str = DEFAULT_REPLAY,
                     on_rows: Callable[[int], None] | None = None, every: int = 64) -> None:
    """Decode the rows of `tasks`' chunk into pixels [len(tasks), n, 3, S, S], boxes [len(tasks), n, 5] and
    valid [n], writing every row (zeros where the image is missing or undecodable: the buffers may be reused).

    `on_rows(done)` is called once every `every` rows and at the end: rows [0, done) are final, so a consumer
    can start on them while the rest decode (stage 1's decode ring).
    """
    start, n = tasks[0].row_start, _shared_rows(tasks)
    done = 0

    def blank(upto: int) -> None:  # rows [done, upto) have no image
        if upto <= done:
            return
        pixels[:, done:upto] = 0
        boxes[:, done:upto] = 0
        valid[done:upto] = False

    for row, key, fields in iter_fields(shards_dir, start, start + n, manifest):
        i = row - start
        blank(i)  # a no-op unless rows were skipped
        image = decode_for_replay(row, key, fields, replay).image
        if image is None:
            blank(i + 1)
        else:
            source = replay_source(image, replay)  # once for every view
            for j, task in enumerate(tasks):
                box = sample_view(seed, row, task.view, *image_size(image))
                replay_view_into(pixels[j, i], source, box, replay)
                boxes[j, i] = box.as_array()
            valid[i] = True
        done = i + 1
        if on_rows is not None and done % every == 0 and done < n:
            on_rows(done)
    blank(n)
    if on_rows is not None:
        on_rows(n)


def decode_task(shards_dir: str, manifest: Manifest, task: Task, seed: int, img_size: int,
                replay: str = DEFAULT_REPLAY) -> TaskInputs:
    """Read the task's rows sequentially, sample each row's view box and replay it."""
    return decode_tasks(shards_dir, manifest, [task], seed, img_size, replay)[0]
