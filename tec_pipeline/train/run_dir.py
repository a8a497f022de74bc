"""A run directory holds one run: its identity, refusals of a resume that would change it, --overwrite, --init-from.

The identity (`RUN/run.json`, key "identity") is every setting that changes the result: the command's options
as resolved (schedule, lr, epochs, warm-up, batch, accum, masking and loss settings, the model actually built
rather than `null`, seed, loader workers, limit, …; so a re-run from RUN/config.yaml is the same run)
with input paths replaced by their content (shard-manifest fingerprint, store fingerprint, checkpoint sha256),
the loop's derived settings (betas, layer decay, world size, micro-batches per epoch), the model's record
(architecture, kind, mode) and, for `--init-from`, the parent checkpoint's sha256. Options are identity by
default; only those in `MAY_CHANGE` (where a run is written, how often it is saved, on which device, …) may
differ on resume. A resume with any other difference is refused naming each one, stored and given.

Files this module treats as the run's own (and `--overwrite` removes): checkpoint.pth, checkpoint-<epoch>.pth,
config.yaml, metrics.csv, run.json, tensorboard/, and the temporary files of their atomic writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tec_pipeline import __version__
from tec_pipeline.config import to_plain
from tec_pipeline.data.shards import file_sha256
from tec_pipeline.errors import UserError
from tec_pipeline.train import checkpoint as ckpt_io

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
# Options that do not change what a run computes; everything else is identity.
MAY_CHANGE = frozenset({
    "out",  # where the run lives (a moved run directory is the same run)
    "json",  # where a fine-tune also writes its results record
    "resume", "overwrite", "init_from", "init_optimizer",  # how to treat the directory; the parent is recorded apart
    "save_every", "keep_checkpoints",  # how often / how many checkpoints are kept (saving draws no randomness)
    "device",  # where it computes (the identity still records world size and precision policy)
    "deterministic",  # kernel choice: bit-exactness, not the recipe
    "loader_workers",  # LoopConfig's: compute threads beside the loader (the loader's own --workers is identity)
    "allow_partial",  # its only effect, which rows train, is in the store fingerprint (tasks done)
    "log_every",  # how often losses are reduced and logged: no effect on the weights of a finite run
})
_RUN_FILES = re.compile(r"^(checkpoint(-\d+)?\.pth|config\.yaml|metrics\.csv|run\.json)$")
_TEMP_FILES = re.compile(r"^(\.checkpoint(-\d+)?\.pth\.tmp-(\d+)|(config\.yaml|metrics\.csv|run\.json)\.tmp)$")


@dataclass(frozen=True)
class RunSpec:
    """What a run directory must hold, and how to treat one that holds something else.

    settings: plain, JSON-safe identity of the command (see `command_settings`); overwrite: replace another
    run; init_from: checkpoint whose weights (and, with init_optimizer, optimizer state) start a new run.
    """

    settings: dict[str, Any]
    overwrite: bool = False
    init_from: str | None = None
    init_optimizer: bool = False


@dataclass(frozen=True)
class OpenedRun:
    identity: dict[str, Any]
    resume: bool  # continue from RUN/checkpoint.pth
    parent: Path | None  # --init-from checkpoint to load (a fresh start only)


def command_settings(config: Any, fingerprints: Mapping[str, str | None]) -> dict[str, Any]:
    """The identity part of a command's frozen config: every field not in MAY_CHANGE, plain; the fields named in
    `fingerprints` (input paths) are recorded by content, e.g. {'shards': manifest fingerprint}."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in MAY_CHANGE:
            continue
        value = getattr(config, f.name)
        if f.name in fingerprints and value is not None:
            out[f.name] = {"content": fingerprints[f.name]}
        else:
            out[f.name] = to_plain(value)
    return out


def run_spec(config: Any, fingerprints: Mapping[str, str | None]) -> RunSpec:
    """A RunSpec from a command config with optional `overwrite`, `init_from`, `init_optimizer` fields."""
    return RunSpec(command_settings(config, fingerprints), bool(getattr(config, "overwrite", False)),
                   getattr(config, "init_from", None), bool(getattr(config, "init_optimizer", False)))


def default_spec(run_config: Any) -> RunSpec:
    """The spec of a run_training call that passed none: its command config's fields, without fingerprints."""
    if run_config is not None and dataclasses.is_dataclass(run_config):
        return run_spec(run_config, {})
    return RunSpec({})


def rerun_config(config: Any) -> Any:
    """`config` as RUN/config.yaml records it: the resolved job with a resume's directory handling (resume on,
    overwrite off), so that `tec COMMAND --config RUN/config.yaml` continues this run rather than wiping it."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    names = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in (("resume", True), ("overwrite", False)) if k in names})


def loop_settings(loop_cfg: Any, world_size: int, micro_per_epoch: int, record: Mapping[str, Any]) -> dict:
    """Identity contributed by the loop: its config (minus MAY_CHANGE), ranks, micro-batches per epoch and the
    model's record (checkpoint_extra minus paths)."""
    plain = {k: v for k, v in to_plain(loop_cfg).items() if k not in MAY_CHANGE}
    model = {k: to_plain(v) for k, v in record.items() if k not in ("base_checkpoint",)}  # a path, not content
    return {**plain, "world_size": world_size, "micro_batches_per_epoch": micro_per_epoch, "model_record": model}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def identity_differences(stored: Mapping[str, Any], given: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'name: stored X, given Y' for every setting that differs (nested dicts by dotted name)."""
    out: list[str] = []
    for key in sorted(set(stored) | set(given)):
        name = f"{prefix}{key}"
        a, b = stored.get(key, "<absent>"), given.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: stored {_short(a)}, given {_short(b)}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temp_files(run_dir: Path) -> list[str]:
    """Delete temporary files of atomic writes left by a killed run (a checkpoint's only when its writer, named
    by the PID in the file name, is gone). Returns their names."""
    removed = []
    for path in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        m = _TEMP_FILES.match(path.name)
        if not m or (m.group(3) and int(m.group(3)) != os.getpid() and _pid_alive(int(m.group(3)))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        log.info("removed %d stale temporary file(s) of a killed run in %s: %s", len(removed), run_dir,
                 ", ".join(removed))
    return removed


def run_files(run_dir: Path) -> list[Path]:
    """The files (and tensorboard/) of a run in `run_dir`; other files are not ours and are left alone."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _RUN_FILES.match(p.name) or p.name == "tensorboard")


def _clear(run_dir: Path) -> None:
    for path in run_files(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["identity"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({e.__class__.__name__}); it records which run {run_dir} holds — "
                        "pass --overwrite to start over, or choose another --out") from None


def write_identity(run_dir: Path, identity: dict[str, Any], parent: Path | None) -> None:
    record = {"identity": identity, "notes": {"parent_path": str(parent) if parent else None,
                                              "version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    tmp = run_dir / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, run_dir / RUN_FILE)


def _parent_record(spec: RunSpec, run_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    if spec.init_from is None:
        if spec.init_optimizer:
            raise UserError("--init-optimizer takes the optimizer state of the --init-from checkpoint; give "
                            "--init-from RUN/checkpoint.pth too")
        return None, None
    parent = Path(spec.init_from)
    if not parent.is_file():
        raise UserError(f"--init-from {parent}: no such checkpoint file; give RUN/checkpoint.pth of a finished run")
    if parent.resolve().parent == run_dir.resolve():
        raise UserError(f"--init-from {parent} lies in --out {run_dir}; a continued run gets a new directory "
                        "(--out NEW), so the parent run stays as it is")
    return {"sha256": file_sha256(parent), "optimizer": spec.init_optimizer}, parent


def _refusal(run_dir: Path, differences: list[str]) -> UserError:
    shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
    return UserError(f"{run_dir} holds another run ({shown}); resume with the same settings, or start over with "
                     f"--overwrite, or continue from its weights with --init-from {run_dir / ckpt_io.LATEST} "
                     "--out NEW")


def open_run(run_dir: Path, spec: RunSpec, loop_part: dict[str, Any], resume: bool, is_main: bool) -> OpenedRun:
    """Decide whether `run_dir` resumes, starts fresh or is refused; on rank 0 create/clear/record it accordingly.

    Refuses (UserError) a resume whose identity differs, a fresh start into a directory holding another run
    without --overwrite, and a directory holding a checkpoint but no identity (written before identities).
    """
    parent_record, parent = _parent_record(spec, run_dir)
    identity = {**loop_part, **spec.settings, "init_from": parent_record}
    if is_main:
        remove_stale_temp_files(run_dir)
    stored, existing = read_identity(run_dir), run_files(run_dir)
    has_checkpoint = (run_dir / ckpt_io.LATEST).is_file()
    if spec.overwrite:
        if is_main and existing:
            log.info("--overwrite: removing the previous run's files in %s (%s)", run_dir,
                     ", ".join(p.name for p in existing))
            _clear(run_dir)
    elif existing and stored is None:
        if has_checkpoint or any(p.name.startswith("checkpoint") for p in existing):
            raise UserError(f"{run_dir} holds a run that records no identity ({RUN_FILE} is missing), so a resume "
                            "cannot be checked; pass --overwrite to start over, or --init-from "
                            f"{run_dir / ckpt_io.LATEST} --out NEW to continue from its weights")
    elif stored is not None:
        if differences := identity_differences(stored, identity):
            raise _refusal(run_dir, differences)
        if not has_checkpoint and any(p.name.startswith("checkpoint-") for p in existing):
            raise UserError(f"{run_dir} holds epoch checkpoints but no {ckpt_io.LATEST}; copy the newest "
                            f"checkpoint-<epoch>.pth over {ckpt_io.LATEST} to resume from it, or pass --overwrite")
        if not resume and has_checkpoint:
            raise UserError(f"{run_dir} already holds this run (--no-resume was given); pass --overwrite to start "
                            "it over, or drop --no-resume to continue it")
    will_resume = resume and has_checkpoint and not spec.overwrite
    if is_main and not will_resume:
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused start leaves no directory behind
        _clear(run_dir)  # what is left belongs to this very run, killed before its first checkpoint
        write_identity(run_dir, identity, parent)
    return OpenedRun(identity, will_resume, None if will_resume else parent)


def load_parent(model: nn.Module, optimizer: torch.optim.Optimizer, parent: Path, with_optimizer: bool) -> None:
    """Start from `parent`'s weights (strict) and optionally its optimizer moments; this run's own
    hyperparameters (lr, weight decay, betas) are kept, since the new schedule sets them."""
    ck = ckpt_io.load_checkpoint(parent)
    try:
        model.load_state_dict(ck["model"], strict=True)
    except RuntimeError as e:
        raise UserError(f"--init-from {parent} does not fit this model ({str(e).splitlines()[0][:160]}); give a "
                        "checkpoint of the same architecture and kind") from None
    if with_optimizer:
        own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"--init-optimizer: the optimizer state in {parent} does not fit this run ({e}); "
                            "drop --init-optimizer to take the weights only") from None
        for group, settings in zip(optimizer.param_groups, own, strict=True):
            group.update(settings)
    pos = ck.get("data_position", {})
    log.info("initialised from %s (its epoch %s, step %s)%s", parent, pos.get("epoch"),
             ck.get("schedule", {}).get("step"), " with its optimizer state" if with_optimizer else "")
