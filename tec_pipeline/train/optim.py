"""Optimizer parameter groups and AdamW, built on timm's group helpers (wrap, don't fork).

Pretraining (MAE/TEC, spec §4): timm `param_groups_weight_decay` semantics — no decay for parameters with
ndim <= 1 and for names ending in `.bias`; 3-D tokens (cls_token, mask_token) *are* decayed because no skip list
is passed, as in the reference. Fine-tuning (spec §8): BEiT layer-wise lr decay, where timm's ViT
`group_matcher` puts cls_token, pos_embed and patch_embed in layer 0 (scale decay^(depth+1)), block b in layer
b+1 and everything else (final norm, fc_norm, head) in the top layer (scale 1); 1-D parameters and
`model.no_weight_decay()` are not decayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups (no-decay, decay) of the trainable parameters; frozen ones are left out."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=())


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Groups per (layer, decay/no-decay), each with an `lr_scale` = layer_decay^(top − layer)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=tuple(skip),
                                    layer_decay=layer_decay)


def build_adamw(groups: list[dict[str, Any]], lr: float, betas: Sequence[float]) -> torch.optim.AdamW:
    """AdamW over `groups`; the schedule overwrites each group's lr every step."""
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float],
                    layer_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW with timm weight-decay groups, or layer-decay groups when `layer_decay` is given."""
    if layer_decay is None:
        groups = weight_decay_groups(model, weight_decay)
    else:
        groups = layer_decay_groups(model, weight_decay, layer_decay)
    return build_adamw(groups, lr, betas)
