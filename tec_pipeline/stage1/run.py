"""Stage 1: run the frozen base model once over V views of every image and fill the target store.

Work is split into tasks = (view, chunk row-range) planned from the manifest; each task is computed and written
by exactly one owner, whole chunks only, and marked done after its data, so tasks can run in any order, on any
worker, any number of times, and a rerun skips what is finished. The pending tasks of one chunk form a group
that shares one read and decode. Executors: in-process (`local.py`; under torchrun one per rank, each with
its `plan.rank_share` of the groups) or dask.distributed (`cluster.py`). Writers on one store claim their tasks
(`store.claims`), so several runs on one `--out` never write the same task.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from typing import Any

from tec_pipeline.config import to_plain
from tec_pipeline.data.shards import Manifest, load_manifest
from tec_pipeline.devices import resolve_device
from tec_pipeline.errors import UserError
from tec_pipeline.models.base import EncoderCheckpoint, load_encoder
from tec_pipeline.outputs import require_free_space, require_writable, write_errors
from tec_pipeline.stage1.config import CacheConfig, resolve_amp, validate_config
from tec_pipeline.stage1.plan import (
    RESUMABLE_ATTRS,
    chunk_groups,
    estimated_bytes,
    rank_share,
    store_attributes,
    store_spec,
)
from tec_pipeline.stage1.ranks import Ranks, coordination, from_main, rank_device, ranks_from_env, total
from tec_pipeline.store.attributes import VOLATILE_ATTRS
from tec_pipeline.store.claims import ClaimBook, local_root
from tec_pipeline.store.layout import StoreSpec, Task
from tec_pipeline.store.target_store import TargetStore

log = logging.getLogger(__name__)
__all__ = ["CacheConfig", "cache_targets"]


def _pending_before_creation(out: str, spec: StoreSpec) -> list[Task]:
    """Tasks still to run at `out`: those not done in an existing store, every task of a new one."""
    try:
        store = TargetStore.open(out)
        if "done" in store.group():  # a creation killed half-way may lack it: create_or_resume completes it
            return store.pending_tasks()
    except UserError:
        pass
    return [Task(v, t, t * spec.chunk_rows, min(spec.rows, (t + 1) * spec.chunk_rows))
                for v in range(spec.views) for t in range(spec.tasks_per_view)]


def _open_store(cfg: CacheConfig, manifest: Manifest, ckpt: EncoderCheckpoint, rows: int,
                precision: dict[str, str]) -> list[list[Task]]:
    """Rank 0's part: check free space, create or resume the store; returns the pending chunk groups."""
    spec = store_spec(cfg, ckpt, rows)
    pending = _pending_before_creation(cfg.out, spec)
    require_writable(cfg.out)
    require_free_space(cfg.out, estimated_bytes(spec, pending), f"the {len(pending)} pending tasks",
                       "finished tasks are kept")
    attrs = store_attributes(cfg, manifest, ckpt, rows, precision)
    store = _write_errors(cfg, lambda: TargetStore.create_or_resume(cfg.out, spec, attrs,
                                                                    VOLATILE_ATTRS | RESUMABLE_ATTRS))
    return chunk_groups(store.pending_tasks())


def _write_errors(cfg: CacheConfig, fn: Any) -> Any:
    """fn(), with a write the destination refused (full disk, read-only, quota) as one line; finished tasks stay
    done."""
    with write_errors(cfg.out, "finished tasks are kept; free space or fix permissions and rerun to continue"):
        return fn()


def cache_targets(cfg: CacheConfig, progress: bool = False,
                  encoder: tuple[Any, EncoderCheckpoint] | None = None) -> dict[str, Any]:
    """Create or resume the store at cfg.out and compute every pending task. Returns a short summary
    (on every rank under torchrun, with 'rank'; the counts cover all ranks).

    encoder: (model, checkpoint) instead of loading cfg.base_model, in-process executor only (the host-path
    benchmark's stand-in: a model with its own `stored_targets`).
    """
    validate_config(cfg)
    ranks = ranks_from_env()
    manifest = load_manifest(cfg.shards)
    model, ckpt = encoder or load_encoder(cfg.base_model, cfg.base_arch, input_size=cfg.input_size)
    rows = manifest.total_rows if cfg.limit is None else min(cfg.limit, manifest.total_rows)
    store_spec(cfg, ckpt, rows)  # the --topk / --last-layers checks, before any connection or write
    with ExitStack() as stack, coordination(ranks):
        client = None
        if cfg.workers or cfg.scheduler:
            from tec_pipeline.stage1.cluster import cluster_device_type, connect

            client, cluster = connect(cfg)  # a scheduler that does not answer fails here, before any store
            stack.callback(client.close)
            if cluster is not None:
                stack.callback(cluster.close)
            device_type = cluster_device_type(client, cfg.device)
            device = None
        else:
            device = resolve_device(rank_device(cfg.device, ranks))
            device_type = device.type
        amp = resolve_amp(cfg.amp, device_type)
        precision = {"autocast": amp, "device_type": device_type}
        groups = from_main(ranks, lambda: _open_store(cfg, manifest, ckpt, rows, precision))
        total_tasks = cfg.views * -(-rows // cfg.chunk_rows)
        mine = rank_share(groups, ranks.rank, ranks.world)
        log.info("store %s: %d views x %d rows, %d of %d tasks pending%s; base model %s (%s, sha256 %s), %s on %s",
                 cfg.out, cfg.views, rows, sum(map(len, groups)), total_tasks,
                 f", {sum(map(len, mine))} on rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else "",
                 ckpt.arch.name, ckpt.fmt, ckpt.sha256[:12], amp, device_type)
        t0 = time.perf_counter()
        images, tasks_run, compute_cpu = _write_errors(cfg, lambda: _execute(cfg, client, model, manifest, mine,
                                                                             device, amp, ranks, progress))
        images, tasks_run = total(ranks, images), total(ranks, tasks_run)
        seconds = time.perf_counter() - t0
    return {"store": cfg.out, "tasks_run": tasks_run, "tasks_total": total_tasks, "images": images,
            "tasks_left_to_other_writers": sum(map(len, groups)) - tasks_run,
            "seconds": seconds, "img_s": images / seconds if seconds > 0 else 0.0, "rank": ranks.rank,
            "world": ranks.world, "precision": precision,
            "compute_cpu_s": compute_cpu, "config": to_plain(dataclasses.asdict(cfg))}


def _execute(cfg: CacheConfig, client: Any, model: Any, manifest: Manifest, groups: list[list[Task]],
             device: Any, amp: str, ranks: Ranks, progress: bool) -> tuple[int, int, float | None]:
    """(images, tasks) computed by this process's executor over `groups` (claimed group by group), and this
    process's CPU seconds in the compute step (None on dask: its workers compute); tasks another live writer
    holds are left to it."""
    if not groups:
        return 0, 0, 0.0  # a rank beyond the pending groups simply finishes
    if client is not None:
        from tec_pipeline.stage1.cluster import run_on_dask

        return *run_on_dask(client, cfg, groups, progress), None
    from tec_pipeline.stage1.local import run_in_process

    store = TargetStore.open(cfg.out, mode="r+")
    claims = ClaimBook(local_root(cfg.out))
    try:
        images, tasks, compute_cpu = run_in_process(cfg, store, model, manifest, groups, device, amp, claims,
                                                    progress and ranks.is_main)
    finally:
        claims.close()
    if claims.refused:
        log.warning("%d tasks were left to another live writer on %s (claimed); rerun after it ends to check",
                    claims.refused, cfg.out)
    return images, tasks, compute_cpu
