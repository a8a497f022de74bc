"""Stage-1 decoding: read a chunk's images once and replay every pending view of it (uint8, host memory).

Runs in DataLoader worker processes (in-process executor), dask workers or torchrun ranks alike; the pixels
stay uint8 until they are on the device (4x fewer bytes to copy than float32). With the torch replay, clean
JPEGs are decoded by simplejpeg into arrays (data/jpeg.py), the largest single saving of the host path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from tec_pipeline.data.jpeg import decode_for_replay, image_size
from tec_pipeline.data.shards import Manifest, iter_fields
from tec_pipeline.data.views import DEFAULT_REPLAY, replay_source, replay_view_into, sample_view
from tec_pipeline.store.layout import Task


@dataclass(frozen=True)
class TaskInputs:
    """Decoded views of one task: pixels uint8 [n,3,S,S], boxes int32 [n,5], valid bool [n]."""

    task: Task
    pixels: torch.Tensor
    boxes: np.ndarray
    valid: np.ndarray

    def pin_memory(self) -> TaskInputs:
        """Called by DataLoader(pin_memory=True): page-locked pixels copy to the device asynchronously."""
        return dataclasses.replace(self, pixels=self.pixels.pin_memory())


def decode_tasks(shards_dir: str, manifest: Manifest, tasks: list[Task], seed: int, img_size: int,
                 replay: str = DEFAULT_REPLAY) -> list[TaskInputs]:
    """Tasks of one chunk (same rows, any views): read and decode each image once, then sample and replay every
    task's view box on it with `replay`. Returns one TaskInputs per task, in the order given."""
    start, stop = tasks[0].row_start, tasks[0].row_stop
    if any((t.row_start, t.row_stop) != (start, stop) for t in tasks):
        raise ValueError(f"tasks of different row ranges cannot share a decode: {tasks}")
    n = stop - start
    pixels = _pixel_buffer((len(tasks), n, 3, img_size, img_size))  # every row is written below
    boxes = np.zeros((len(tasks), n, 5), dtype=np.int32)
    valid = np.zeros(n, dtype=bool)
    for row, key, fields in iter_fields(shards_dir, start, stop, manifest):
        image = decode_for_replay(row, key, fields, replay).image
        if image is None:
            continue
        i, source = row - start, replay_source(image, replay)  # once for every view
        for j, task in enumerate(tasks):
            box = sample_view(seed, row, task.view, *image_size(image))
            replay_view_into(pixels[j, i], source, box, replay)
            boxes[j, i] = box.as_array()
        valid[i] = True
    if not valid.all():  # undecodable or missing rows (a truncated shard yields none): blank pixels
        pixels[:, torch.from_numpy(~valid)] = 0
    return [TaskInputs(task, pixels[j], boxes[j], valid.copy()) for j, task in enumerate(tasks)]


def _pixel_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uint8 tensor of `shape`; in a DataLoader worker, in shared memory from the start (as torch's own
    default_collate allocates batches there), so it reaches the main process without the copy into shared
    memory torch would make when sending it (77 MB per ViT-B task)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def decode_task(shards_dir: str, manifest: Manifest, task: Task, seed: int, img_size: int,
                replay: str = DEFAULT_REPLAY) -> TaskInputs:
    """Read the task's rows sequentially, sample each row's view box and replay it."""
    return decode_tasks(shards_dir, manifest, [task], seed, img_size, replay)[0]


class ChunkDataset(Dataset):
    """Item i: the decoded inputs of every task of chunk group i (decoded in a loader worker)."""

    def __init__(self, shards: str, manifest: Manifest, groups: list[list[Task]], seed: int, img_size: int,
                 replay: str = DEFAULT_REPLAY) -> None:
        self.shards, self.manifest, self.groups, self.seed, self.img_size = shards, manifest, groups, seed, img_size
        self.replay = replay

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> list[TaskInputs]:
        return decode_tasks(self.shards, self.manifest, self.groups[i], self.seed, self.img_size, self.replay)


class _Order(Sampler[int]):
    """Group indices in order, passed through `admit` (run in the main process just before the group is
    dispatched to a decode worker: the point where a task is claimed)."""

    def __init__(self, count: int, admit: Callable[[int], bool]) -> None:
        self.count, self.admit = count, admit

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return (i for i in range(self.count) if self.admit(i))


def decoded_groups(dataset: ChunkDataset, workers: int, pin: bool,
                   admit: Callable[[int], bool] = lambda i: True) -> Iterable[list[TaskInputs]]:
    """Every admitted group's inputs, decoded `workers` processes ahead (0: in this process), pinned if `pin`."""
    return DataLoader(dataset, batch_size=None, sampler=_Order(len(dataset), admit), num_workers=workers,
                      collate_fn=lambda x: x, prefetch_factor=2 if workers else None, pin_memory=pin)
