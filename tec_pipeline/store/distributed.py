"""Stage-1 tasks on a dask.distributed cluster: a LocalCluster (`--workers N`) or an existing scheduler.

Each task is one function call that decodes, computes and writes its own chunks, then sets its `done` flag, so
a task lost with its worker is simply run again elsewhere (dask `retries`). Workers load the base model once
per process and open the store by URL inside the process (no handles cross a fork or the network).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm import tqdm

from tec_pipeline.errors import UserError
from tec_pipeline.store.layout import Task

log = logging.getLogger(__name__)
_WORKER_STATE: dict[tuple[Any, ...], Any] = {}
TASK_RETRIES = 3


def _worker_resources(cfg: Any) -> tuple[Any, Any, Any]:
    """(model, manifest, store) for this worker process, loaded on first use."""
    from tec_pipeline.data.shards import load_manifest
    from tec_pipeline.models.base import load_encoder
    from tec_pipeline.store.layout import TargetStore

    key = (cfg.base_model, cfg.base_arch, cfg.input_size, cfg.shards, cfg.out)
    if key not in _WORKER_STATE:
        torch.set_num_threads(1)  # one task per worker thread; processes give the parallelism
        model, _ = load_encoder(cfg.base_model, cfg.base_arch, input_size=cfg.input_size)
        _WORKER_STATE[key] = (model, load_manifest(cfg.shards), TargetStore.open(cfg.out, mode="r+"))
    return _WORKER_STATE[key]


def run_task(cfg: Any, task: Task) -> int:
    """Compute and write one task on a dask worker; returns the number of rows written."""
    from tec_pipeline.devices import resolve_device
    from tec_pipeline.store.cache import compute_task, decode_task

    model, manifest, store = _worker_resources(cfg)
    img_size = store.attrs["base_model"]["input_size"]
    inputs = decode_task(cfg.shards, manifest, task, cfg.seed, img_size)
    result = compute_task(model, inputs, cfg.topk, cfg.last_layers, cfg.batch_size, resolve_device("cpu"))
    store.write_task(task, **result)
    return len(inputs.pixels)


def run_on_dask(cfg: Any, tasks: list[Task], progress: bool) -> int:
    """Run `tasks` on a LocalCluster of cfg.workers processes, or on the cluster at cfg.scheduler."""
    from dask.distributed import Client, LocalCluster, as_completed

    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise UserError(f"cannot reach dask scheduler {cfg.scheduler}: {e}") from None
        cluster = None
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.WARNING)
        client = Client(cluster)
    try:
        futures = [client.submit(run_task, cfg, t, key=f"task-v{t.view}-c{t.index}", retries=TASK_RETRIES, pure=False)
                   for t in tasks]
        images, t0 = 0, time.perf_counter()
        with tqdm(total=len(tasks), desc="cache-targets", unit="task", disable=not progress) as bar:
            for future in as_completed(futures):
                images += future.result()
                bar.update(1)
                bar.set_postfix(img_s=f"{images / (time.perf_counter() - t0):.0f}")
        return images
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
