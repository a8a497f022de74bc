"""Stage-2 items from a target store: the stored box replayed on the image, with that view's target rows.

Target rows are read one chunk-aligned slice at a time as the shard stream advances (never row by row) and
kept in their stored (codec) form, so a row waiting in the loader's shuffle buffer costs its stored bytes;
they are decoded when the row is emitted. The store is opened lazily inside each loader worker (a handle must
not cross a fork).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch

from tec_pipeline.data.jpeg import decode_for_replay
from tec_pipeline.data.shards import Sample
from tec_pipeline.data.views import ViewBox, recorded_replay, replay_view_uint8
from tec_pipeline.errors import UserError
from tec_pipeline.store.integrity import damage_explained
from tec_pipeline.store.target_store import TargetStore

TARGET_KEYS = ("features", "attention", "topk_index")


def known_valid_rows(store: TargetStore, view: int) -> np.ndarray:
    """bool [N]: rows of `view` that hold targets (valid, and their task done)."""
    spec = store.spec
    # this view's flags only: on object storage each flag is one request (layout.py: done chunks are (1, 1))
    done = np.repeat(np.asarray(store.array("done")[view], dtype=bool), spec.chunk_rows)[: spec.rows]
    return np.asarray(store.array("valid")[view], dtype=bool) & done


class CachedViews:
    """Item function for `loader.stream_epoch`: replays view `view_id`'s stored box and attaches its targets.

    Only rows with targets are streamed (`known_valid`); every one of them yields an item (stage 1 decoded its
    image), so the loader can skip unread rows on resume. Targets come out float16 when the store holds
    float16 (exact), else float32.
    """

    validity_known = True

    def __init__(self, store_url: str, view_id: int, img_size: int) -> None:
        self.store_url, self.view_id, self.img_size = store_url, view_id, img_size
        self._store: TargetStore | None = None
        self._block: tuple[int, int, dict[str, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_block": None}

    @property
    def store(self) -> TargetStore:
        if self._store is None:
            self._store = TargetStore.open(self.store_url)
        return self._store

    @cached_property
    def replay(self) -> str:
        """The replay stage 1 computed the targets on (pretrain refused any other before the first step)."""
        return recorded_replay(self.store.attrs["views"])

    def decode(self, row: int, key: str | None, fields: dict[str, bytes] | None) -> Sample:
        """The loader's decode of a row for this store's replay (the torch replay's JPEGs by simplejpeg, into an
        array: the pixels stage 1 replayed from)."""
        return decode_for_replay(row, key, fields, self.replay)

    def known_valid(self) -> np.ndarray:
        return known_valid_rows(self.store, self.view_id)

    def stored(self, row: int) -> dict[str, np.ndarray]:
        """The row's arrays as stored (codec form), copied out of the chunk-aligned block holding it."""
        if self._block is None or not self._block[0] <= row < self._block[1]:
            spec = self.store.spec
            start = (row // spec.chunk_rows) * spec.chunk_rows
            stop = min(start + spec.chunk_rows, spec.rows)
            self._block = None  # free the old block before reading the next
            with damage_explained(self.store, self.view_id, start, stop):  # a damaged chunk: one line, not a trace
                self._block = (start, stop, {name: self.store.array(name)[self.view_id, start:stop]
                                             for name in spec.row_arrays if name != "valid"})
        i = row - self._block[0]
        return {name: value[i].copy() for name, value in self._block[2].items()}

    def __call__(self, sample: Sample, stored: dict[str, np.ndarray]) -> dict[str, Any]:
        if sample.image is None:
            raise UserError(f"row {sample.row} has targets in {self.store_url} but its image does not decode here; "
                            "the shards or the image decoder differ from stage 1's")
        codec = self.store.codec
        exact16 = codec.name == "fp16"  # float16 stored: float16 carries it exactly, at half the bytes
        box = ViewBox.from_array(stored["boxes"])
        item: dict[str, Any] = {"pixels": replay_view_uint8(sample.image, box, self.img_size, self.replay),
                                "rows": sample.row,
                                "boxes": torch.from_numpy(stored["boxes"].astype(np.int32))}
        for key, decode in (("features", codec.features.decode), ("attention", codec.attention.decode)):
            value = torch.from_numpy(np.ascontiguousarray(decode(stored)))
            item[key] = value.half() if exact16 else value
        item["topk_index"] = torch.from_numpy(stored["topk_index"].astype(np.int64))
        return item
