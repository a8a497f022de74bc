"""Training checkpoints: atomic writes, epoch copies, and RNG states that load with `weights_only=True`.

A checkpoint is a plain dict of tensors and built-in values (see `loop.run_training` for its keys), so
`torch.load(path, weights_only=True)` reads it. It is written to a temporary file in the same directory, synced,
then `os.replace`d over the target: a crash or an exception mid-write leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tec_pipeline.errors import UserError

LATEST = "checkpoint.pth"
_EPOCH_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


def epoch_checkpoint_name(epoch: int) -> str:
    """File name of the copy kept at the end of `epoch` (0-based, as in MAE's checkpoint-<epoch>.pth)."""
    return f"checkpoint-{epoch}.pth"


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy and python RNG states as tensors/plain lists."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed torch (all devices), numpy's global RNG and python's `random` with `seed`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global torch/numpy/python RNG states after the block (whatever it drew or seeded)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened, so it is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failed(path: Path, e: Exception) -> UserError:
    # torch's zip writer reports a full disk as RuntimeError("... failed writing file ..."), the OS as OSError
    reason = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:160]
    kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} had been written yet"
    return UserError(f"cannot write checkpoint {path}: {reason}; {kept} — free space (or fix the file system) and "
                     "rerun the same command to continue from it")


def save_atomic(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """torch.save `obj` to `path` via a temporary file in the same directory and os.replace.

    A failed write (full disk, read-only file system) raises UserError and leaves `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise _write_failed(path, e) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def copy_atomic(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` (a hard link where the filesystem allows, else a byte copy), atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        raise _write_failed(dst, e) from e
    finally:
        if tmp.exists():
            tmp.unlink()


def prune_epoch_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoint-<epoch>.pth files (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _EPOCH_RE.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink()


TRAINING_KEYS = ("model", "optimizer", "schedule", "data_position", "rng")


def _recovery_advice(path: Path) -> str:
    copies = sorted((int(m.group(1)), p) for p in path.parent.glob("checkpoint-*.pth")
                    if (m := _EPOCH_RE.match(p.name)))
    if path.name == LATEST and copies:
        return f"copy {copies[-1][1]} (the newest epoch copy) over it to resume from there, or pass --overwrite"
    return "restore it from a copy, or pass --overwrite to start the run over"


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one of our training checkpoints on CPU with weights_only=True; an unreadable, damaged or foreign file
    is a UserError that says how to recover."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a text file gives KeyError, a cut one RuntimeError/EOFError, ...
        detail = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}{': ' + detail if detail else ''}); "
                        f"{_recovery_advice(path)}") from None
    missing = [k for k in TRAINING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a training checkpoint of this project (no {', '.join(missing)}); "
                        f"{_recovery_advice(path)}")
    return ckpt
