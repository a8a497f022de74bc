"""The target store's schema (design §3.4): which arrays a store holds, their shapes, dtypes and chunks, and
what a task is. Reading and writing them is `store/target_store.py`; checking them, `store/integrity.py`.

| array | shape | dtype | chunks |
|---|---|---|---|
| features (+ codec extras, codecs.py) | (V, N, L, D) | codec's | (1, C, L, D) |
| attention (+ codec extras) | (V, N, 1+k, H, L) | codec's | (1, C, 1+k, H, L) |
| topk_index | (V, N, k) | int16 | (1, C, k) |
| boxes | (V, N, 5) | int32: top, left, height, width, flip | (1, C, 5) |
| valid | (V, N) | bool | (1, C) |
| done | (V, T), T = ceil(N / C) | bool | **(1, 1)** |

`done` deviates from the design table's (1, T): every task sets its own flag, and Zarr has no locks, so with one
chunk per view two workers finishing tasks of the same view would read-modify-write the same object and one
flag could be lost. With (1, 1) each task owns its flag's object as it owns its data chunks.

A task is (view, chunk row-range) and owns exactly one chunk of every array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tec_pipeline.errors import UserError
from tec_pipeline.store.codecs import ArrayLayout, TensorCodec, get_codec

FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoreSpec:
    """Dimensions of a store: V views, N rows, L patches, D dim, H heads, k top rows, C rows per chunk."""

    views: int
    rows: int
    patches: int
    dim: int
    heads: int
    k: int
    chunk_rows: int
    codec: str

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "codec" and (not isinstance(value, int) or value < (0 if f.name == "k" else 1)):
                raise UserError(f"store {f.name} must be a positive integer, got {value!r}")
        if self.k > self.patches or self.patches > np.iinfo(np.int16).max:
            raise UserError(f"k={self.k} must not exceed the {self.patches} patches (and patches < 32768)")
        get_codec(self.codec)

    @property
    def queries(self) -> int:
        """Attention query rows stored per view: the CLS row + k patch rows."""
        return 1 + self.k

    @property
    def tasks_per_view(self) -> int:
        return math.ceil(self.rows / self.chunk_rows)

    def arrays(self) -> list[tuple[ArrayLayout, tuple[int, int], int]]:
        """(layout, leading shape, rows per chunk) of every array: the codec's, topk, boxes, valid, done."""
        per_row = [
            *get_codec(self.codec).layouts(self.patches, self.dim, self.queries, self.heads),
            ArrayLayout("topk_index", (self.k,), ("rank",), "int16", "zstd"),
            ArrayLayout("boxes", (5,), ("box",), "int32", "zstd"),
            ArrayLayout("valid", (), (), "bool", "zstd"),
        ]
        done = (ArrayLayout("done", (), (), "bool"), (self.views, self.tasks_per_view), 1)  # (1, 1): see above
        return [*[(lay, (self.views, self.rows), self.chunk_rows) for lay in per_row], done]

    @property
    def row_arrays(self) -> list[str]:
        """Names of the arrays with one entry per row (all but done)."""
        return [lay.name for lay, _, _ in self.arrays()][:-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Task:
    """One unit of stage-1 work: rows [row_start, row_stop) of one view = one chunk of every array."""

    view: int
    index: int
    row_start: int
    row_stop: int

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


def check_task_rows(spec: StoreSpec, task: Task, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """A task's inputs checked against the spec, invalid rows zeroed, cast to their stored dtypes."""
    c, n = spec.chunk_rows, task.rows
    if task != Task(task.view, task.index, task.index * c, min(spec.rows, (task.index + 1) * c)) or not (
        0 <= task.view < spec.views and 0 <= task.index < spec.tasks_per_view
    ):
        raise ValueError(f"{task} is not a task of this store ({spec})")
    floats = (np.float16, np.float32)  # float16 passes through: stage 1 casts on the device for the fp16 codec
    wanted = {  # valid first: the others are zeroed where it is False
        "valid": ((n,), np.bool_),
        "features": ((n, spec.patches, spec.dim), floats),
        "attention": ((n, spec.queries, spec.heads, spec.patches), floats),
        "topk_index": ((n, spec.k), np.int16),
        "boxes": ((n, 5), np.int32),
    }
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in wanted.items():
        if name not in inputs:  # a target handed over already encoded (check_encoded_rows)
            continue
        value = np.asarray(inputs[name])
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {shape} for {task}")
        if isinstance(dtype, tuple):
            dtype = value.dtype.type if value.dtype.type in dtype else np.float32
        if name != "valid" and not out["valid"].all():
            value = np.where(out["valid"].reshape(-1, *[1] * (value.ndim - 1)), value, 0)
        if np.issubdtype(dtype, np.signedinteger) and value.size:
            lo, hi = (0, spec.patches - 1) if name == "topk_index" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
            if value.min() < lo or value.max() > hi:
                raise ValueError(f"{name} must lie in {lo}..{hi}")  # checked before the cast can wrap
        out[name] = value.astype(dtype, copy=False)  # a task can be hundreds of MB: no needless copies
    return out


def check_encoded_rows(part: TensorCodec, trailing: tuple[int, ...], arrays: Mapping[str, np.ndarray],
                       valid: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """A target handed over already encoded by `part` (stage 1 quantises on the device): exactly the part's
    arrays, each [n, ...] in its stored dtype, and the invalid rows the encoding of zeros (what check_task_rows
    makes of a raw target's invalid rows)."""
    layouts = part.layouts(trailing, tuple(f"d{i}" for i in range(len(trailing))))
    if set(arrays) != {layout.name for layout in layouts}:
        raise ValueError(f"{what} encoded as {sorted(arrays)}, the codec stores {[lay.name for lay in layouts]}")
    for layout in layouts:
        value = arrays[layout.name]
        if value.shape != (len(valid), *layout.trailing) or value.dtype != np.dtype(layout.dtype):
            raise ValueError(f"{layout.name} is {value.dtype} {value.shape}, expected {layout.dtype} "
                             f"{(len(valid), *layout.trailing)}")
    if not valid.all():
        zeros = part.encode(np.zeros((int((~valid).sum()), *trailing), dtype=np.float32))
        if any(not np.array_equal(arrays[name][~valid], value) for name, value in zeros.items()):
            raise ValueError(f"{what}: the invalid rows must be encoded zeros")
    return dict(arrays)
