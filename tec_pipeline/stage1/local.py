"""The in-process executor: decode workers → device → writer threads, one device (one torchrun rank).

Decode worker processes read and decode chunk groups ahead into the decode ring's slots (page-locked on
CUDA); the main thread copies each batch's uint8 pixels to the device as soon as its rows are decoded, runs
the base model and brings the targets back in stored form; writer threads encode and write them while the
next batches run. A group is claimed when the ring sends it to a worker, so another writer on the same store
skips it, and released once its tasks are written.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from tec_pipeline.data.shards import Manifest
from tec_pipeline.devices import threads_beside_workers
from tec_pipeline.progress import ProgressLog
from tec_pipeline.stage1.compute import compute_task
from tec_pipeline.stage1.config import CacheConfig, quantizes_on_device
from tec_pipeline.stage1.ring import DecodeJob, DecodeRing
from tec_pipeline.stage1.write import WriterPool
from tec_pipeline.store.claims import ClaimBook
from tec_pipeline.store.layout import Task
from tec_pipeline.store.target_store import TargetStore

log = logging.getLogger(__name__)


def run_in_process(cfg: CacheConfig, store: TargetStore, model: torch.nn.Module, manifest: Manifest,
                   groups: list[list[Task]], device: torch.device, amp: str, claims: ClaimBook,
                   progress: bool) -> tuple[int, int, float]:
    """Compute and write every task of `groups` not held or finished by another writer; returns (images, tasks)
    computed here and the CPU seconds of the compute step on this thread (normalise, base model, casts, copies
    back: on a CPU device, the work a GPU would do; `tec bench` reports the host path without it)."""
    model.to(device)
    img_size = store.attrs["base_model"]["input_size"]
    job = DecodeJob(cfg.shards, manifest, groups, cfg.seed, img_size, cfg.replay, every=cfg.batch_size)
    images, tasks, t0, compute_cpu = 0, 0, time.perf_counter(), 0.0

    def admit(i: int) -> bool:
        if not claims.claim(groups[i]):
            return False
        if all(store.is_done(t) for t in groups[i]):  # finished by another writer since the plan was made
            for task in groups[i]:
                claims.release(task)
            return False
        return True

    bar = tqdm(total=sum(map(len, groups)), desc="cache-targets", unit="task", disable=not progress)
    lines = ProgressLog("cache-targets", sum(map(len, groups)), "tasks", enabled=not progress)  # off a terminal
    with threads_beside_workers(device, cfg.loader_workers), \
            WriterPool(store, cfg.writer_threads, claims.release) as writers, \
            DecodeRing(job, cfg.loader_workers, pin=device.type == "cuda", admit=admit) as ring:
        for group in ring:
            for inputs in group:
                started = time.thread_time()
                result = compute_task(model, inputs, cfg.topk, cfg.last_layers, cfg.batch_size, device, amp,
                                      store.codec, quantizes_on_device(cfg, device))
                compute_cpu += time.thread_time() - started
                writers.submit(inputs.task, result)
                images, tasks = images + len(inputs.pixels), tasks + 1
                bar.update(1)
                lines.update(1, len(inputs.pixels))
                bar.set_postfix(img_s=f"{images / (time.perf_counter() - t0):.0f}")
    bar.close()
    return images, tasks, compute_cpu
