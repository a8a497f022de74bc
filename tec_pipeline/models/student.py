"""The TEC student (spec §3): masked ViT encoder, MLP CLS token, encoder adaptor, shared decoder trunk, two heads.

Built from timm's ViT pieces (PatchEmbed, Block, Mlp), not a fork of them. Encoder keys are timm
VisionTransformer's (cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.*, norm.*) and the input adaptor is
`cls_token_mlp.*`, so `vit.fold_mlp_cls_token` turns the encoder into plain timm weights. The other keys
(`encoder_adaptor.*`, `decoder_blocks.*`, `decoder_pos_embed`, `forward_fea_decoder.*`, `forward_att_decoder.*`)
follow the reference implementation, so a reference TEC pretraining state dict loads strictly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from tec_pipeline.models.losses import attention_loss, feature_loss
from tec_pipeline.models.masking import random_masking, restore_sequence
from tec_pipeline.models.vit import ViTArch, init_mae_layers, sincos_pos_embed_2d

# Encoder, decoder and head norms use eps 1e-6; the encoder adaptor's two norms use PyTorch's default 1e-5
# (spec §13.1). timm's Block defaults to exact GELU (nn.GELU) and drop_path 0, which TEC needs (spec §13.5).
_norm = partial(nn.LayerNorm, eps=1e-6)
ADAPTOR_NORM_EPS = 1e-5
LOSS_WEIGHTS = {"fea": 1.0, "att": 1.0}  # fixed in the reference code, no ramp (spec §3.7)


class FeatureAdaptor(nn.Module):
    """Encoder adaptor (spec §3.3): fuses all depth block outputs into one [B, N, D] latent.

    One LayerNorm over the whole depth·D concatenation, `num_adap` chunks of depth/num_adap consecutive layers,
    each Linear(chunk → D) then y = MLP(y) + y (MLP D → mid → D, GELU), summed, LayerNorm(D).
    """

    def __init__(self, embed_dim: int, depth: int, num_adap: int, mid_dim: int) -> None:
        super().__init__()
        if num_adap < 1 or depth % num_adap:
            raise ValueError(f"num_adap={num_adap} must be >= 1 and divide the encoder depth {depth}")
        chunk = embed_dim * (depth // num_adap)
        self.adap_before = nn.LayerNorm(embed_dim * depth, eps=ADAPTOR_NORM_EPS)
        self.fuse_fcs = nn.ModuleList([nn.Linear(chunk, embed_dim) for _ in range(num_adap)])
        self.adap_mlps = nn.ModuleList([Mlp(embed_dim, mid_dim, embed_dim) for _ in range(num_adap)])
        self.adap_after = nn.LayerNorm(embed_dim, eps=ADAPTOR_NORM_EPS)

    def forward(self, collected: Sequence[Tensor]) -> Tensor:
        """collected: depth tensors [B, N, D] (the last post-norm) -> adap_latent [B, N, D]."""
        chunks = self.adap_before(torch.cat(list(collected), dim=-1)).chunk(len(self.fuse_fcs), dim=-1)
        out = 0
        for chunk, fuse, mlp in zip(chunks, self.fuse_fcs, self.adap_mlps, strict=True):
            y = fuse(chunk)
            out = out + mlp(y) + y
        return self.adap_after(out)


class _DecoderHead(nn.Module):
    """What each decoder owns (spec §3.4): its embed D → dec, mask token and final norm; the trunk is shared."""

    def __init__(self, embed_dim: int, decoder_dim: int) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_norm = _norm(decoder_dim)

    def decode(self, latent: Tensor, ids_restore: Tensor, pos_embed: Tensor, blocks: nn.ModuleList) -> Tensor:
        """latent [B, 1 + L_keep, D] -> normed decoder sequence [B, 1 + L, dec] in patch order."""
        x = restore_sequence(self.decoder_embed(latent), self.mask_token, ids_restore) + pos_embed
        for block in blocks:
            x = block(x)
        return self.decoder_norm(x)


class FeatureHead(_DecoderHead):
    """Predicts the teacher features of every patch (spec §3.5): Linear(dec → pred_dim), CLS dropped.

    pred_dim is the base model's width D (spec §3.6b); the student's own width only feeds decoder_embed.
    """

    def __init__(self, embed_dim: int, decoder_dim: int, pred_dim: int | None = None) -> None:
        super().__init__(embed_dim, decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, pred_dim or embed_dim)

    def forward(self, decoded: Tensor) -> Tensor:
        """decoded [B, 1 + L, dec] -> pred_fea [B, L, pred_dim]."""
        return self.decoder_pred(decoded)[:, 1:]


class AttentionHead(_DecoderHead):
    """Predicts the teacher's attention-logit rows (spec §3.6) for the CLS query and the top-k patch queries."""

    def __init__(self, embed_dim: int, decoder_dim: int, num_heads: int, pred_dim: int | None = None) -> None:
        super().__init__(embed_dim, decoder_dim)
        pred_dim = pred_dim or embed_dim  # the base model's D and H (spec §3.6b): aligned with the stored rows
        if pred_dim % num_heads:
            raise ValueError(f"pred_dim {pred_dim} is not divisible by num_heads {num_heads}")
        self.decoder_qk = nn.Linear(decoder_dim, 2 * pred_dim)  # [q | k], heads contiguous (spec §13.4)
        self.num_heads = num_heads
        self.scale = pred_dim**-0.5  # pred_dim^-0.5, not head_dim^-0.5 (spec §11.3)

    def forward(self, decoded: Tensor, topk_index: Tensor) -> Tensor:
        """decoded [B, 1 + L, dec], topk_index [B, k] patch indices -> pred_att [B, 1 + k, H, L].

        Rows are the CLS query then the queries at tokens 1 + topk_index, in the given order; keys are all
        1 + L tokens with the CLS-key column dropped — the store's attention layout.
        """
        batch, tokens, _ = decoded.shape
        qk = self.decoder_qk(decoded).reshape(batch, tokens, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)  # each [B, H, 1 + L, D/H]
        rows = torch.cat([topk_index.new_zeros(batch, 1), topk_index + 1], dim=1).long()  # [B, 1 + k]
        q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, self.num_heads, -1, q.shape[-1]))
        logits = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, 1 + k, 1 + L]
        return logits[..., 1:].permute(0, 2, 1, 3)


class TECStudent(nn.Module):
    """TEC student for any `ViTArch` (spec §3): predicts a base model's enhanced targets from a masked view.

    k: number of top-k patch-query rows predicted (stores holding k' >= k serve it: their top-k is sorted).
    mlp_token: CLS token = cls_token_mlp(cls_token) + pos_embed[:, :1] (the input adaptor, spec §3.2).
    pred_att: add the attention head and loss; without it the head is not built (no unused parameters for
    DDP) and only the feature loss is trained. att_tau: target temperature of the attention loss.
    num_adap: encoder-adaptor chunks, default depth // 3.
    decoder_depth: shared decoder blocks (default arch.decoder_depth); width, heads and MLP ratio come from
    arch.decoder_*.
    pred_dim, pred_heads: width and heads the heads predict at, the base model's D and H (spec §3.6b);
    default the student's own, which is exactly the reference model.
    """

    def __init__(self, arch: ViTArch, k: int = 15, mask_ratio: float = 0.75, mlp_token: bool = True,
                 pred_att: bool = True, att_tau: float = 1.8, decoder_depth: int | None = None,
                 num_adap: int | None = None, pred_dim: int | None = None, pred_heads: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if pred_att and not 1 <= k <= arch.num_patches:
            raise ValueError(f"k must be in 1..{arch.num_patches} (the number of patches), got {k}")
        self.arch, self.k, self.mask_ratio = arch, k, mask_ratio
        self.mlp_token, self.pred_att, self.att_tau = mlp_token, pred_att, att_tau
        dim, dec = arch.embed_dim, arch.decoder_embed_dim

        # encoder: timm VisionTransformer names, fixed sin-cos pos_embed kept in the state dict (frozen)
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, arch.grid_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(dim, arch.num_heads, arch.mlp_ratio, qkv_bias=True, norm_layer=_norm) for _ in range(arch.depth)]
        )
        self.norm = _norm(dim)
        if mlp_token:
            self.cls_token_mlp = Mlp(dim, int(dim * arch.mlp_ratio), dim)
        self.encoder_adaptor = FeatureAdaptor(dim, arch.depth, num_adap or arch.depth // 3, 4 * dec)

        # decoders: shared trunk and pos-embed, own embed / mask token / norm per head
        self.pred_dim, self.pred_heads = pred_dim or dim, pred_heads or arch.num_heads
        self.decoder_blocks = nn.ModuleList(
            [Block(dec, arch.decoder_num_heads, arch.decoder_mlp_ratio, qkv_bias=True, norm_layer=_norm)
             for _ in range(arch.decoder_depth if decoder_depth is None else decoder_depth)]
        )
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dec, arch.grid_size), requires_grad=False)
        self.forward_fea_decoder = FeatureHead(dim, dec, self.pred_dim)
        if pred_att:
            self.forward_att_decoder = AttentionHead(dim, dec, self.pred_heads, self.pred_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE init; the patch-embed weight as a flattened Linear, its bias keeps the Conv2d default (§13.2)."""
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for head in (self.forward_fea_decoder, getattr(self, "forward_att_decoder", None)):
            if head is not None:
                nn.init.normal_(head.mask_token, std=0.02)
        self.apply(init_mae_layers)

    def _cls_input(self, batch: int) -> Tensor:
        """The encoder's CLS input [B, 1, D]; the MLP acts on the single learned token, not per image."""
        token = self.cls_token_mlp(self.cls_token) if self.mlp_token else self.cls_token
        return (token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def forward_encoder(self, x: Tensor, noise: Tensor | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """x [B, 3, S, S], noise [B, L] -> (depth outputs [B, 1 + L_keep, D], mask [B, L], ids_restore [B, L]).

        The outputs are blocks 0..depth-2 and norm(last block), the encoder adaptor's input.
        """
        tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
        tokens, mask, ids_restore = random_masking(tokens, self.mask_ratio, noise)
        h = torch.cat([self._cls_input(x.shape[0]).to(tokens.dtype), tokens], dim=1)
        collected = []
        for block in self.blocks:
            h = block(h)
            collected.append(h)
        collected[-1] = self.norm(h)
        return collected, mask, ids_restore

    def predict(self, x: Tensor, topk_index: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Predictions for one masked view.

        x [B, 3, S, S]; topk_index [B, k] teacher patch indices (required with pred_att); noise [B, L].
        Returns pred_fea [B, L, pred_dim], pred_att [B, 1 + k, pred_heads, L] (with pred_att), mask [B, L], ids_restore [B, L].
        """
        collected, mask, ids_restore = self.forward_encoder(x, noise)
        latent = self.encoder_adaptor(collected)
        trunk = (ids_restore, self.decoder_pos_embed, self.decoder_blocks)
        fea_head = self.forward_fea_decoder
        out = {"pred_fea": fea_head(fea_head.decode(latent, *trunk)), "mask": mask, "ids_restore": ids_restore}
        if self.pred_att:
            if topk_index is None:
                raise ValueError("predict: topk_index [B, k] is required when pred_att is on")
            att_head = self.forward_att_decoder
            out["pred_att"] = att_head(att_head.decode(latent, *trunk), topk_index)
        return out

    def _select_targets(self, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Targets cut to this student's k: the first k top-k indices and the first 1 + k attention rows."""
        selected = {"features": targets["features"]}
        if self.pred_att:
            topk, att = targets["topk_index"], targets["attention"]
            if topk.shape[1] < self.k or att.shape[1] < 1 + self.k:
                raise ValueError(f"targets hold k={topk.shape[1]} top-k rows, the student needs k={self.k}")
            selected["topk_index"] = topk[:, : self.k]
            selected["attention"] = att[:, : 1 + self.k]
        return selected

    def forward(self, x: Tensor, targets: Mapping[str, Tensor], noise: Tensor | None = None,
                masks_per_view: int = 1) -> dict[str, Any]:
        """Losses for a batch of views.

        x [B, 3, S, S]; targets: 'features' [B, L, D], 'attention' [B, 1+k', H, L], 'topk_index' [B, k'] with
        k' >= k (the last two only with pred_att); noise [M·B, L] (default U(0, 1)) makes the masks
        reproducible. masks_per_view M > 1 draws M independent masks per view: the batch and its targets are
        tiled M times (copy m is rows m·B..(m+1)·B-1) and run as one batch. Every sample removes the same
        number of patches and predicts the same number of rows, so the returned losses equal the mean of the
        M single-mask losses.

        Returns 'loss' (weighted total), 'loss_fea', 'loss_att' (with pred_att), 'weights' {'fea', 'att'}
        (only the terms present) and 'mask' [M·B, L].
        """
        if masks_per_view < 1:
            raise ValueError(f"masks_per_view must be >= 1, got {masks_per_view}")
        selected = self._select_targets(targets)
        if masks_per_view > 1:
            x = x.repeat(masks_per_view, 1, 1, 1)
            selected = {name: t.repeat(masks_per_view, *([1] * (t.dim() - 1))) for name, t in selected.items()}
        preds = self.predict(x, selected.get("topk_index"), noise)
        losses = {"fea": feature_loss(preds["pred_fea"], selected["features"], preds["mask"])}
        if self.pred_att:
            losses["att"] = attention_loss(preds["pred_att"], selected["attention"], self.att_tau)
        weights = {name: LOSS_WEIGHTS[name] for name in losses}
        out: dict[str, Any] = {f"loss_{name}": value for name, value in losses.items()}
        out.update(loss=sum(weights[name] * value for name, value in losses.items()), weights=weights,
                   mask=preds["mask"])
        return out
