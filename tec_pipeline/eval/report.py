"""The JSON written by `tec linprobe`, `tec knn` and `tec finetune --json FILE`.

Schema (accuracies in percent; every command writes the common keys):

    {
      "method": "linprobe" | "knn" | "finetune",
      "top1": float, "top5": float,        # linprobe/knn: of the pooling with the best top-1 ("pooling")
      "n_train": int, "n_test": int,       # images used (finetune n_train: images per training epoch)
      "num_classes": int,
      "checkpoint": str, "checkpoint_sha256": str, "checkpoint_format": str,   # as read by models.base
      "arch": str, "img_size": int,        # the encoder's architecture preset name and input size
      "seed": int, "version": str,         # seed of the evaluation; tec-pipeline version
      # linprobe and knn:
      "pooling": "cls" | "mean",
      "per_pooling": {"cls": {"top1", "top5", ...}, "mean": {"top1", "top5", ...}},
          # cls = CLS token after the final norm; mean = mean of the patch tokens after the final norm
          # linprobe entries also hold "weight_decay" (lbfgs: the L2 penalty chosen on a 10 % hold-out of
          # train) or "lr" and "config" (mae)
      # linprobe: "protocol": {"name": "lbfgs" | "mae", "description": str}
      # knn: "k": int, "temperature": float
      # finetune: "epochs": int, "run_dir": str, "final_train_loss": float, "config": {...}
    }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tec_pipeline import __version__
from tec_pipeline.models.base import EncoderCheckpoint

REQUIRED_KEYS = ("method", "top1", "top5", "n_train", "n_test", "checkpoint", "arch")


def evaluation_record(method: str, encoder: EncoderCheckpoint, n_train: int, n_test: int, seed: int,
                      result: dict[str, Any]) -> dict[str, Any]:
    """The common keys of the schema above, then the method's own result entries."""
    return {"method": method, "top1": result["top1"], "top5": result["top5"], "n_train": n_train,
            "n_test": n_test, "num_classes": result.get("num_classes"), "checkpoint": encoder.path,
            "checkpoint_sha256": encoder.sha256, "checkpoint_format": encoder.fmt, "arch": encoder.arch.name,
            "img_size": encoder.arch.img_size, "seed": seed, "version": __version__,
            **{k: v for k, v in result.items() if k not in ("top1", "top5", "num_classes")}}


def write_json(record: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write `record` as indented JSON, atomically (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
