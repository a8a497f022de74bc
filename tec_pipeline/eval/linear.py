"""Linear probe on frozen features. Two protocols (`tec linprobe --protocol`), recorded in the JSON:

- `lbfgs` (default): standardised features, a softmax classifier fitted by full-batch L-BFGS. Deterministic,
  seconds even for 60k × 768 features. The L2 penalty is chosen from `WEIGHT_DECAYS` on a seeded 10 % hold-out
  of the training features, then the classifier is refitted on all of them and scored once on the test set.
  It is NOT MAE's protocol, so its numbers are not comparable with published linear-probe numbers.
- `mae`: MAE's BatchNorm + linear head trained with LARS for 90 epochs (see `eval/linear_mae.py`), on the same
  frozen centre-view features.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tec_pipeline.eval.features import POOLINGS, Features, num_classes, topk_accuracy
from tec_pipeline.eval.linear_mae import MAEProbeConfig, mae_probe

log = logging.getLogger(__name__)
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
HOLDOUT_FRACTION = 0.1
SINGLE_THREAD_BELOW = 1 << 22  # N·D under which one thread is faster (per-op threading overhead dominates)
PROTOCOLS = {
    "lbfgs": "standardised frozen features, softmax classifier by full-batch L-BFGS, L2 penalty chosen on a 10 % "
             "hold-out; not MAE's protocol: not comparable with published linear-probe numbers",
    "mae": "MAE main_linprobe: BatchNorm1d(affine=False) + Linear, LARS (momentum 0.9, wd 0), lr 6.4 (blr 0.1 x "
           "16384 / 256), 90 epochs (10 warm-up), cosine; minibatch 256; frozen centre-view features extracted "
           "once (no per-epoch augmentation)",
}


@contextlib.contextmanager
def _threads_for(x: torch.Tensor) -> Iterator[None]:
    previous = torch.get_num_threads()
    if x.numel() < SINGLE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each feature to zero mean and unit variance using the training set's statistics."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, max_iter: int = 100,
               init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: minimise CE(xWᵀ + b, y) + wd/2·|W|²; returns W [C, D], b [C].

    x: [N, D] standardised features, y: [N] labels; `init` (W, b) warm-starts the solver.
    """
    zeros = (torch.zeros(classes, x.shape[1], device=x.device), torch.zeros(classes, device=x.device))
    w0, b0 = init if init is not None else zeros
    weight, bias = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-5, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def _holdout_size(n: int, classes: int) -> int:
    """Hold-out images for choosing the penalty; 0 when too few for a meaningful hold-out."""
    n_hold = int(n * HOLDOUT_FRACTION)
    return n_hold if n_hold >= classes else 0


def _fits(n: int, classes: int) -> int:
    """L-BFGS fits one `probe` runs: one per penalty on the hold-out split, then the final one."""
    return 1 + (len(WEIGHT_DECAYS) if _holdout_size(n, classes) else 0)


def _choose_weight_decay(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int, tick: Callable[[], object]
                         ) -> tuple[float, tuple[torch.Tensor, torch.Tensor] | None]:
    """The penalty with the best hold-out accuracy (ties: the stronger one) and its solution."""
    n_hold = _holdout_size(len(x), classes)
    if not n_hold:  # keep the middle of the grid
        return WEIGHT_DECAYS[len(WEIGHT_DECAYS) // 2], None
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    hold, fit = perm[:n_hold], perm[n_hold:]
    xf, xh = standardize(x[fit], x[hold])
    best: tuple[float, float, tuple[torch.Tensor, torch.Tensor] | None] = (-1.0, 0.0, None)
    solution = None
    for wd in sorted(WEIGHT_DECAYS, reverse=True):  # strong to weak penalty, each warm-started from the last
        solution = fit_linear(xf, y[fit], classes, wd, init=solution)
        tick()
        accuracy = float((F.linear(xh, *solution).argmax(dim=1) == y[hold]).float().mean())
        if accuracy > best[0]:
            best = (accuracy, wd, solution)
    return best[1], best[2]


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          classes: int, seed: int = 0, device: torch.device | None = None,
          tick: Callable[[], object] = lambda: None) -> dict:
    """Fit on train features [N, D] / labels [N], score on test; {'top1', 'top5', 'weight_decay'}.

    Runs on `device` (default CPU); on CUDA the fit is still deterministic up to float rounding order.
    `tick` is called after each L-BFGS fit (`_fits` of them).
    """
    device = device or torch.device("cpu")
    x, y = train_x.float().to(device), train_y.to(device)
    with _threads_for(train_x):
        wd, warm = _choose_weight_decay(x, y, classes, seed, tick)
        xtr, xte = standardize(x, test_x.float().to(device))
        w, b = fit_linear(xtr, y, classes, wd, init=warm)
        tick()
    return {**topk_accuracy(F.linear(xte, w, b).cpu(), test_y), "weight_decay": wd}


def linear_probe(train: Features, test: Features, seed: int = 0, device: torch.device | None = None,
                 protocol: str = "lbfgs", progress: bool = False) -> dict:
    """Per pooling results, plus the best pooling's top1/top5 at the top level, and the protocol used.
    `progress`: a tqdm bar over the L-BFGS fits (lbfgs) or training epochs (mae) of both poolings."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    fit = probe if protocol == "lbfgs" else mae_probe
    classes = num_classes(train.labels, test.labels)
    steps, unit = (_fits(len(train), classes), "fit") if protocol == "lbfgs" else (MAEProbeConfig().epochs, "epoch")
    per = {}
    with tqdm(total=steps * len(POOLINGS), desc=f"linear probe ({protocol})", unit=unit, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for pooling in POOLINGS:
            per[pooling] = fit(train.pooled(pooling), train.labels, test.pooled(pooling), test.labels, classes,
                               seed, device=device, tick=bar.update)
    for pooling in POOLINGS:  # after the bar: a log line inside it would break the bar's line
        log.info("linear probe (%s): top-1 %.2f%%", pooling, per[pooling]["top1"])
    best = max(POOLINGS, key=lambda p: per[p]["top1"])
    return {"top1": per[best]["top1"], "top5": per[best]["top5"], "pooling": best, "per_pooling": per,
            "num_classes": classes, "protocol": {"name": protocol, "description": PROTOCOLS[protocol]}}
