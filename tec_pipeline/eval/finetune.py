"""End-to-end fine-tuning (spec §8, MAE/BEiT recipe) on timm, through the shared training loop.

Model: timm VisionTransformer with global average pooling → fc_norm → head (MAE's `global_pool=True`; the
encoder's final norm is dropped, fc_norm and the head (trunc-normal std 2e-5) are new), drop path increasing
linearly to `drop_path`. Optimiser: AdamW (0.9, 0.999), BEiT layer-wise lr decay where cls_token and pos_embed
sit in layer 0 with patch_embed (scale decay^(depth+1); the reference's −1 bug is not repeated), no weight
decay for 1-D parameters, pos_embed and cls_token; per-step cosine with warm-up to `min_lr`. Data: timm
RandomResizedCrop(0.08, 1) + flip + RandAugment + RandomErasing on each PIL image, drawn from a counter-based
seed (seed, epoch, row) so a resumed run sees the same augmentations; Mixup/CutMix with label smoothing
(SoftTargetCrossEntropy), or label-smoothed cross-entropy when both are 0. Scored once at the end on the
centre view of the test shards (top-1/top-5).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tec_pipeline.data.shards import Sample, load_manifest
from tec_pipeline.data.views import IMAGENET_MEAN, IMAGENET_STD
from tec_pipeline.devices import resolve_device
from tec_pipeline.errors import UserError
from tec_pipeline.eval.features import topk_correct
from tec_pipeline.models.base import EncoderCheckpoint
from tec_pipeline.models.vit import build_vit
from tec_pipeline.train.checkpoint import preserved_rng, seed_all
from tec_pipeline.train.loop import LoopConfig, run_training
from tec_pipeline.train.run_dir import run_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of `tec finetune` (spec §8 defaults; mixup/cutmix off as in the reference CLI)."""

    checkpoint: str
    train_shards: str
    test_shards: str
    out: str
    json: str | None = None  # the results record (eval/report.py) is also written here
    arch: str | None = None
    input_size: int | None = None  # run the encoder at this size (pos_embed resampled); None: its own
    epochs: int = 50
    batch_size: int = 64
    accum: int = 1
    blr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    clip_grad: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.1
    aa: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    seed: int = 0
    workers: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    save_every: int = 0
    resume: bool = True
    overwrite: bool = False  # --out holds another run: clear it first
    init_from: str | None = None  # a new run from this checkpoint's weights (train.run_dir)
    init_optimizer: bool = False  # ... and its optimizer state
    amp: str = "auto"  # auto | bf16 | fp16 (GradScaler) | none, as `LoopConfig.amp`


def loop_config(cfg: FinetuneConfig) -> LoopConfig:
    """The training-loop part of a fine-tune config (AdamW betas (0.9, 0.999), layer decay)."""
    return LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, accum=cfg.accum, blr=cfg.blr, min_lr=cfg.min_lr,
                      warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                      layer_decay=cfg.layer_decay, clip_grad=cfg.clip_grad, save_every=cfg.save_every,
                      seed=cfg.seed, resume=cfg.resume, loader_workers=cfg.workers, amp=cfg.amp)


def build_classifier(encoder: EncoderCheckpoint, classes: int, drop_path: float = 0.0) -> VisionTransformer:
    """timm ViT (avg pool → fc_norm → head) initialised from the encoder; only fc_norm and head are new."""
    model = build_vit(encoder.arch, num_classes=classes, global_pool="avg", drop_path_rate=drop_path)
    # MAE fine-tuning replaces the final norm by fc_norm after pooling, so the encoder's norm is not used
    state = {k: v for k, v in encoder.state_dict.items() if not k.startswith("norm.")}
    result = model.load_state_dict(state, strict=False)
    new = [k for k in result.missing_keys if not k.startswith(("fc_norm.", "head."))]
    if result.unexpected_keys or new:
        raise UserError(f"{encoder.path} does not fit a {encoder.arch.name} classifier: unexpected "
                        f"{result.unexpected_keys[:4]}, missing {new[:4]}")
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


def counter_seed(*keys: int) -> int:
    """A 32-bit seed that depends only on `keys` (seed, epoch, row), as the view sampler does."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with Pillow < 11 semantics: keeping 0 bits gives a black image (Pillow >= 11 raises)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> Any:
    """Swap the posterize op of the transform's RandAugment ("inc1" policies reach 0 bits) for `_posterize`."""
    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


class TrainAugment:
    """Item function for the loader: timm training transform of one sample, seeded by (seed, epoch, row)."""

    def __init__(self, img_size: int, seed: int, epoch: int, aa: str, reprob: float) -> None:
        self.seed, self.epoch = seed, epoch
        self.transform = _patch_posterize(create_transform(
            img_size, is_training=True, auto_augment=aa or None, interpolation="bicubic", re_prob=reprob,
            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD))

    def __call__(self, sample: Sample) -> dict[str, Any] | None:
        if sample.image is None or sample.label is None:
            return None
        with preserved_rng():  # the transform draws from python/numpy/torch global RNGs
            seed_all(counter_seed(self.seed, self.epoch, sample.row))
            image = self.transform(sample.image)
        return {"images": image, "labels": sample.label}


class ClassificationStep:
    """Loop step: Mixup/CutMix + soft-target CE, or label-smoothed CE."""

    def __init__(self, cfg: FinetuneConfig, classes: int) -> None:
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=0.5,
                               mode="batch", label_smoothing=cfg.smoothing, num_classes=classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, target = batch["images"], batch["labels"]
        if self.mixup is not None:
            even = len(images) - len(images) % 2  # batch-mode Mixup needs pairs; drops one image at most
            images, target = self.mixup(images[:even], target[:even])
        return {"loss": self.criterion(model(images), target)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device) -> dict:
    """Top-1/top-5 (percent) of `model` over batches {'images', 'labels'}; {'top1', 'top5', 'n'}."""
    model.eval().to(device)
    correct, n = {1: 0, 5: 0}, 0
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch["images"].to(device)).float().cpu()
        labels = torch.as_tensor(batch["labels"]).long()
        if (labels < 0).any():
            raise UserError("the test shards have unlabelled images; evaluation needs labelled shards")
        for k, c in topk_correct(logits, labels).items():
            correct[k] += c
        n += len(labels)
    if n == 0:
        raise UserError("no decodable test images; check --test-shards and --limit-test")
    return {"top1": 100.0 * correct[1] / n, "top5": 100.0 * correct[5] / n, "n": n}


def class_count(train_shards: str, test_shards: str) -> int:
    """Classes from the train manifest's class names (the test manifest must agree when it lists any)."""
    train, test = load_manifest(train_shards), load_manifest(test_shards)
    if not train.class_names:
        raise UserError(f"{train_shards} lists no class names (unlabelled shards?); fine-tuning needs labels")
    if test.class_names and test.class_names != train.class_names:
        raise UserError(f"{train_shards} and {test_shards} list different classes; use shards of one data set")
    return len(train.class_names)


def finetune(cfg: FinetuneConfig, encoder: EncoderCheckpoint, rank: int = 0, world_size: int = 1) -> dict:
    """Fine-tune `encoder` on the train shards into cfg.out, then score the test shards' centre views."""
    from tec_pipeline.data.loader import center_batches, steps_per_epoch, stream_epoch

    loop = loop_config(cfg)  # validates the loop options before anything reads the shards
    classes = class_count(cfg.train_shards, cfg.test_shards)
    seed_all(cfg.seed)  # the new head's initialisation
    model = build_classifier(encoder, classes, cfg.drop_path)
    size = encoder.arch.img_size
    steps = steps_per_epoch(cfg.train_shards, cfg.batch_size, world_size, cfg.workers, cfg.limit_train)

    def batches(epoch: int, start: int) -> Iterable[dict[str, Any]]:
        augment = TrainAugment(size, cfg.seed, epoch, cfg.aa, cfg.reprob)
        return stream_epoch(cfg.train_shards, augment, cfg.batch_size, cfg.seed, epoch, start, rank, world_size,
                            cfg.workers, cfg.limit_train)

    extra = {"arch": encoder.arch.to_dict(), "kind": "finetune", "num_classes": classes,
             "base_checkpoint": encoder.path}
    content = {"checkpoint": encoder.sha256, "train_shards": load_manifest(cfg.train_shards).fingerprint,
               "test_shards": load_manifest(cfg.test_shards).fingerprint}
    # the saved config and the identity record the encoder actually built (re-running from RUN/config.yaml)
    resolved = dataclasses.replace(cfg, arch=encoder.arch.name, input_size=size)
    result = run_training(model, batches, steps, loop, cfg.out, extra, step_fn=ClassificationStep(cfg, classes),
                          run_config=resolved, run_spec=run_spec(resolved, content))
    scores = evaluate_classifier(model, center_batches(cfg.test_shards, size, cfg.batch_size, cfg.limit_test),
                                 resolve_device("auto"))
    return {"top1": scores["top1"], "top5": scores["top5"], "n_test": scores["n"],
            "n_train": steps * cfg.batch_size * world_size, "num_classes": classes, "epochs": cfg.epochs,
            "run_dir": str(cfg.out), "final_train_loss": result.last_metrics.get("loss"),
            "config": dataclasses.asdict(resolved)}

