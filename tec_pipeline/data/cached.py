"""Stage-2 items from a target store: the stored box replayed on the image, with that view's target rows.

Target rows are read one chunk-aligned slice at a time as the shard stream advances (never row by row), and
the store is opened lazily inside each loader worker (a handle must not cross a fork).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tec_pipeline.data.shards import Sample
from tec_pipeline.data.views import ViewBox, replay_view_uint8
from tec_pipeline.store.integrity import read_rows_or_explain
from tec_pipeline.store.layout import TargetStore

TARGET_KEYS = ("features", "attention", "topk_index")


class CachedViews:
    """Item function for `loader.stream_epoch`: replays view `view_id`'s stored box and attaches its targets.

    Rows whose image is undecodable, or whose stored row is invalid (undecodable in stage 1, or in a task not
    done under --allow-partial), are dropped.
    """

    def __init__(self, store_url: str, view_id: int, img_size: int, dtype: torch.dtype = torch.float32) -> None:
        self.store_url, self.view_id, self.img_size, self.dtype = store_url, view_id, img_size, dtype
        self._store: TargetStore | None = None
        self._block: tuple[int, int, dict[str, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_block": None}

    def _rows(self, row: int) -> tuple[int, dict[str, np.ndarray]]:
        """The decoded chunk holding `row` (cached until the stream leaves it) and the row's offset in it."""
        if self._block is None or not self._block[0] <= row < self._block[1]:
            if self._store is None:
                self._store = TargetStore.open(self.store_url)
            chunk = self._store.spec.chunk_rows
            start = (row // chunk) * chunk
            stop = min(start + chunk, self._store.spec.rows)
            self._block = (start, stop, read_rows_or_explain(self._store, self.view_id, start, stop))
        return row - self._block[0], self._block[2]

    def __call__(self, sample: Sample) -> dict[str, Any] | None:
        i, block = self._rows(sample.row)
        if sample.image is None or not block["valid"][i]:
            return None
        box = ViewBox.from_array(block["boxes"][i])
        item = {"pixels": replay_view_uint8(sample.image, box, self.img_size), "rows": sample.row,
                "boxes": torch.from_numpy(block["boxes"][i].copy())}
        for key in TARGET_KEYS:
            value = torch.from_numpy(np.ascontiguousarray(block[key][i]))
            item[key] = value if key == "topk_index" else value.to(self.dtype)
        return item
