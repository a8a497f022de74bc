"""Frozen-encoder features on the deterministic centre view, for the linear probe and kNN.

Two poolings of the encoder's output tokens (timm `forward_features`, i.e. after the final norm):
`cls`, the CLS token, and `mean`, the mean of the patch tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tec_pipeline.errors import UserError
from tec_pipeline.models.vit import ViTArch, resolve_arch

log = logging.getLogger(__name__)
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class Features:
    """Pooled features of N images: cls [N, D], mean [N, D] (float32, CPU), labels [N] int64 (-1 = none)."""

    cls: torch.Tensor
    mean: torch.Tensor
    labels: torch.Tensor

    def pooled(self, pooling: str) -> torch.Tensor:
        return {"cls": self.cls, "mean": self.mean}[pooling]

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device) -> Features:
    """Run the frozen encoder (a timm VisionTransformer) over batches {'images' [B,3,S,S], 'labels' [B]}."""
    encoder.eval().to(device)
    prefix = getattr(encoder, "num_prefix_tokens", 1)
    cls, mean, labels = [], [], []
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder.forward_features(batch["images"].to(device, non_blocking=True))  # [B, 1+L, D]
        tokens = tokens.float()
        cls.append(tokens[:, 0].cpu())
        mean.append(tokens[:, prefix:].mean(dim=1).cpu())
        labels.append(torch.as_tensor(batch["labels"]).long())
    if not labels:
        raise UserError("no decodable images to evaluate; check the shards and --limit")
    return Features(torch.cat(cls), torch.cat(mean), torch.cat(labels))


def check_input_size(arch_option: str | None, recorded: ViTArch, checkpoint: str | Path,
                     input_size: int | None = None) -> None:
    """Refuse an --arch whose input size differs from the checkpoint's recorded architecture.

    The recorded architecture wins over --arch (models.base); a different input size, though, means the user
    expects a different evaluation resolution, so it is an error rather than a warning. An explicit
    --input-size says which resolution is meant, so then there is nothing to refuse.
    """
    if arch_option is None or input_size is not None:
        return
    try:
        wanted = resolve_arch(arch_option)
    except ValueError as e:
        raise UserError(str(e)) from None
    if wanted.img_size != recorded.img_size:
        raise UserError(f"--arch {arch_option} has input size {wanted.img_size} but {checkpoint} records "
                        f"{recorded.name} with input size {recorded.img_size}; drop --arch or pass the right file")


def require_labels(features: Features, shards: str | Path) -> None:
    """Evaluation needs a label for every image."""
    missing = int((features.labels < 0).sum())
    if missing:
        raise UserError(f"{missing} of {len(features)} images in {shards} have no label; evaluation needs "
                        "labelled shards (make-shards from fashion-mnist or an ImageFolder)")


def _counted(batches: Iterable[dict[str, Any]], bar: tqdm) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield batch
        bar.update(len(batch["labels"]))


def shard_features(encoder: nn.Module, shards: str | Path, img_size: int, batch_size: int,
                   limit: int | None, device: torch.device, progress: bool = False) -> Features:
    """Centre-view features of the (first `limit`) images of `shards`, in row order; labels required.
    `progress`: a tqdm bar over the images (the stage passes `logs.progress_enabled()`)."""
    from tec_pipeline.data.loader import center_batches
    from tec_pipeline.data.shards import load_manifest

    rows = load_manifest(shards).total_rows
    with tqdm(total=rows if limit is None else min(rows, limit), desc=f"features of {Path(shards).name}",
              unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        features = extract_features(encoder, _counted(center_batches(shards, img_size, batch_size, limit), bar),
                                    device)
    require_labels(features, shards)
    log.info("features of %d images from %s", len(features), shards)
    return features


def num_classes(*label_sets: torch.Tensor) -> int:
    """Classes present: 1 + the largest label seen."""
    return int(max(int(labels.max()) for labels in label_sets)) + 1


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows of scores [N, C] have their label among the top-k classes, for each k (k capped at C)."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices  # [N, kmax]
    hits = top.eq(labels.view(-1, 1))
    return {k: int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{'top1', 'top5'} in percent."""
    correct = topk_correct(scores, labels)
    return {"top1": 100.0 * correct[1] / len(labels), "top5": 100.0 * correct[5] / len(labels)}
