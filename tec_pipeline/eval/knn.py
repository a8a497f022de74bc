"""Weighted k-nearest-neighbour classification on frozen features (DINO's `knn_classifier`).

Features are L2-normalised; each test image takes its k most cosine-similar training images, each voting for
its label with weight exp(similarity / T). Defaults k = 20, T = 0.07 as in DINO.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tec_pipeline.eval.features import POOLINGS, Features, num_classes, topk_accuracy

CHUNK = 1024  # test images per [chunk, N] similarity block: bounds the memory


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = CHUNK,
               device: torch.device | None = None, tick: Callable[[], object] = lambda: None) -> torch.Tensor:
    """Class scores [N_test, classes] (CPU) from train [N, D] / train_labels [N] and test [M, D] features;
    `tick` is called after each chunk of test images."""
    device = device or torch.device("cpu")
    train_n = F.normalize(train.float().to(device), dim=1)
    labels = train_labels.to(device)
    k = min(k, len(train_n))
    out = []
    for start in range(0, len(test), chunk):  # bounded memory: one [chunk, N] similarity block at a time
        test_n = F.normalize(test[start:start + chunk].float().to(device), dim=1)
        sims, idx = (test_n @ train_n.T).topk(k, dim=1)  # [c, k]
        votes = F.one_hot(labels[idx], classes).float()  # [c, k, classes]
        out.append((votes * (sims / temperature).exp().unsqueeze(-1)).sum(dim=1).cpu())
        tick()
    return torch.cat(out)


def knn_evaluate(train: Features, test: Features, k: int = 20, temperature: float = 0.07,
                 device: torch.device | None = None, progress: bool = False) -> dict:
    """Per pooling {'top1', 'top5'} (percent), plus the best pooling's numbers at the top level.
    `progress`: a tqdm bar over the chunks of test images of both poolings."""
    classes = num_classes(train.labels, test.labels)
    with tqdm(total=math.ceil(len(test) / CHUNK) * len(POOLINGS), desc="knn", unit="chunk", disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        per = {p: topk_accuracy(knn_scores(train.pooled(p), train.labels, test.pooled(p), classes, k, temperature,
                                           device=device, tick=bar.update), test.labels) for p in POOLINGS}
    best = max(POOLINGS, key=lambda p: per[p]["top1"])
    return {"top1": per[best]["top1"], "top5": per[best]["top5"], "pooling": best, "per_pooling": per,
            "k": k, "temperature": temperature, "num_classes": classes}
