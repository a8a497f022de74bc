"""Stage-1 chunk groups on a dask.distributed cluster: a LocalCluster (`--workers N`) or an existing scheduler.

One call per chunk group decodes its images once for all its views, computes and writes each task, then sets
its `done` flag, so a group lost with its worker is simply run again elsewhere (dask `retries`). Each worker
process loads the base model once, onto its own device (`--device auto`: its CUDA_VISIBLE_DEVICES GPU, which
`dask cuda worker` or `CUDA_VISIBLE_DEVICES=i dask worker --nworkers 1 --resources GPU=1` gives it), and opens
the store by URL in the process. Paths travel as absolute paths, so workers started elsewhere find them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

import torch
from tqdm import tqdm

from tec_pipeline.errors import UserError
from tec_pipeline.progress import ProgressLog
from tec_pipeline.stage1.config import CacheConfig, quantizes_on_device
from tec_pipeline.store.claims import HEARTBEAT_S, STALE_S
from tec_pipeline.store.layout import Task

log = logging.getLogger(__name__)
_WORKER_STATE: dict[tuple[Any, ...], Any] = {}
_WORKER_LOCK = threading.Lock()
TASK_RETRIES = 3
CONNECT_TIMEOUT_S = 10


def absolute(cfg: CacheConfig) -> CacheConfig:
    """cfg with local paths made absolute (workers run in other directories, perhaps on other hosts)."""
    def fix(path: str) -> str:
        return path if "://" in path or path.startswith(("random:",)) else os.path.abspath(path)
    return dataclasses.replace(cfg, shards=fix(cfg.shards), base_model=fix(cfg.base_model), out=fix(cfg.out))


def worker_device_type(device: str) -> str:
    """The device type a worker computes on (run on every worker before the store is created)."""
    from tec_pipeline.devices import resolve_device

    return resolve_device(device).type


def _worker_resources(cfg: CacheConfig) -> tuple[Any, ...]:
    """(model on its device, device, manifest, store, claims) for this worker process, loaded on first use."""
    from tec_pipeline.data.shards import load_manifest
    from tec_pipeline.devices import resolve_device
    from tec_pipeline.models.base import load_encoder
    from tec_pipeline.store.claims import ClaimBook, local_root
    from tec_pipeline.store.target_store import TargetStore

    key = (cfg.base_model, cfg.base_arch, cfg.input_size, cfg.shards, cfg.out, cfg.device)
    with _WORKER_LOCK:  # a worker with several threads loads the model once
        if key not in _WORKER_STATE:
            device = resolve_device(cfg.device)
            if device.type == "cpu":
                torch.set_num_threads(1)  # one task per worker thread; processes give the parallelism
            model, _ = load_encoder(cfg.base_model, cfg.base_arch, input_size=cfg.input_size)
            store = TargetStore.open(cfg.out, mode="r+")
            _WORKER_STATE[key] = (model.to(device), device, load_manifest(cfg.shards), store,
                                  ClaimBook(local_root(cfg.out)))
        return _WORKER_STATE[key]


def _claim(claims: Any, store: Any, tasks: list[Task]) -> list[Task]:
    """The tasks of `tasks` this worker now holds: waits out a claim left by a dead worker on another host
    (it goes stale after STALE_S); tasks another writer finished meanwhile are dropped."""
    deadline = time.monotonic() + STALE_S + 2 * HEARTBEAT_S
    while True:
        tasks = [t for t in tasks if not store.is_done(t)]
        if not tasks or claims.claim(tasks) or time.monotonic() > deadline:
            return tasks if tasks and claims.owns(tasks[0]) else []
        time.sleep(HEARTBEAT_S)


def run_group(cfg: CacheConfig, tasks: list[Task], storage_options: dict[str, Any]) -> tuple[int, int]:
    """Compute and write one chunk group on a dask worker; returns (images, tasks) written.

    storage_options: the client's (storage.py); they travel with the task, never in `cfg`, which is recorded.
    """
    from tec_pipeline import storage
    from tec_pipeline.stage1.compute import compute_task
    from tec_pipeline.stage1.decode import decode_tasks_in_background
    from tec_pipeline.stage1.write import WriterPool

    storage.use(storage_options)
    model, device, manifest, store, claims = _worker_resources(cfg)
    tasks = _claim(claims, store, tasks)
    if not tasks:
        return 0, 0
    try:
        images = 0
        # decode (a thread), compute and writes (writer threads) overlap within the group, as in process
        with WriterPool(store, cfg.writer_threads, claims.release) as writers:
            for inputs in decode_tasks_in_background(cfg.shards, manifest, tasks, cfg.seed,
                                                     store.attrs["base_model"]["input_size"], cfg.replay,
                                                     every=cfg.batch_size):
                result = compute_task(model, inputs, cfg.topk, cfg.last_layers, cfg.batch_size, device,
                                      store.attrs["targets"]["precision"]["autocast"], store.codec,
                                      quantizes_on_device(cfg, device))
                writers.submit(inputs.task, result)
                images += len(inputs.pixels)
        return images, len(tasks)
    finally:
        for task in tasks:
            claims.release(task)


def connect(cfg: CacheConfig) -> tuple[Any, Any]:
    """(client, cluster or None): the scheduler at cfg.scheduler, which must answer within CONNECT_TIMEOUT_S
    and have a worker, or a LocalCluster of cfg.workers processes. Done before any store is created."""
    from dask.distributed import Client, LocalCluster

    if not cfg.scheduler:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.WARNING)
        return Client(cluster), cluster
    try:
        client = Client(cfg.scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"dask scheduler {cfg.scheduler} did not answer within {CONNECT_TIMEOUT_S} s "
                        f"({e.__class__.__name__}); check the address and that the scheduler runs") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S * 3)
    except (OSError, TimeoutError):
        client.close()
        raise UserError(f"dask scheduler {cfg.scheduler} has no workers; start some (see README)") from None
    return client, None


def cluster_device_type(client: Any, device: str) -> str:
    """The one device type every worker computes on; UserError when workers differ."""
    types = set(client.run(worker_device_type, device).values())
    if len(types) != 1:
        raise UserError(f"dask workers compute on different device types {sorted(types)}; a store needs one "
                        "(start all workers on GPUs, or pass --device cpu)")
    return types.pop()


def run_on_dask(client: Any, cfg: CacheConfig, groups: list[list[Task]], progress: bool) -> tuple[int, int]:
    """Run every chunk group on the client's cluster; on GPU workers (resource GPU) one group per GPU at once."""
    cfg = absolute(cfg)
    workers = client.scheduler_info()["workers"].values()
    resources = {"GPU": 1} if workers and all("GPU" in w.get("resources", {}) for w in workers) else None
    from tec_pipeline import storage

    options = storage.current()
    futures = [client.submit(run_group, cfg, g, options, key=f"group-c{g[0].index}", retries=TASK_RETRIES, pure=False,
                             resources=resources) for g in groups]
    from dask.distributed import as_completed

    images, done, t0 = 0, 0, time.perf_counter()
    lines = ProgressLog("cache-targets", len(groups), "chunk groups", enabled=not progress)  # off a terminal
    with tqdm(total=len(groups), desc="cache-targets", unit="chunk", disable=not progress) as bar:
        for future in as_completed(futures):
            group_images, group_tasks = future.result()
            images, done = images + group_images, done + group_tasks
            bar.update(1)
            lines.update(1, group_images)
            bar.set_postfix(img_s=f"{images / (time.perf_counter() - t0):.0f}")
    return images, done
