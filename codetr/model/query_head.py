"""Co-DINO's query head: the transformer, its prediction branches, denoising, positive queries.

State-dict names (under `query_head.`, as in the official Co-DINO checkpoints):
`transformer.*` (see `transformer.py`), `cls_branches.{i}.*` (Linear D -> C) and
`reg_branches.{i}.{0,2,4}.*` (3-layer MLP D -> 4) for i < dec_layers (decoder layer i) plus
index dec_layers (the encoder proposals, `standard` two-stage only), `label_embedding.weight`
`[C, D]` (denoising, `use_dn` only), `downsample.{0,1}.*` (Conv3x3 s2 + GroupNorm for the extra
co-head level, `num_co_heads > 0` only).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from codetr.boxes import inverse_sigmoid
from codetr.model.denoising import build_denoising_queries
from codetr.model.mlp import MLP
from codetr.model.joint_queries import block_attn_mask, concat_groups, split_groups
from codetr.model.encoder_memory import EncoderMemory
from codetr.model.transformer import CoDinoTransformer

# Focal-loss prior: every class starts at probability 0.01 (RetinaNet); without it (and without
# zeroed box deltas) the DETR barely learns.
_PRIOR_PROB = 0.01


class QueryHead(nn.Module):
    """The one-to-one DETR branch of Co-DINO (the only part that runs at inference).

    Args:
        num_classes: class logits `C`.
        hidden_dim: features `D`.
        nheads: attention heads.
        num_feature_levels: input levels `L`.
        enc_layers: encoder layers.
        dec_layers: decoder layers.
        dim_feedforward: FFN hidden features.
        dropout: dropout probability.
        enc_n_points: encoder sampling points per head and level.
        dec_n_points: decoder sampling points per head and level.
        num_queries: matching queries `Q`.
        two_stage_type: `standard` or `no`.
        embed_init_tgt: learned content queries (see `CoDinoTransformer`).
        decoder_sa_type: `sa`, `ca_label` or `ca_content`.
        fix_refpoints_hw: `no` two-stage reference boxes (see `CoDinoTransformer`).
        pre_norm: LayerNorm on the encoder output.
        use_dn: add contrastive denoising queries in training.
        dn_number: denoising budget (groups = dn_number // most gt per image).
        dn_box_noise_scale: denoising box noise scale.
        dn_label_noise_ratio: denoising label noise ratio (flip probability = ratio / 2).
        num_co_heads: auxiliary heads (positive-query projections, extra level).
        activation_checkpoint: recompute encoder layers in backward.
        decoder_query_pos: `ref_point_head` (Co-DINO) or `proposal` (Co-Deformable-DETR: fixed
            positional queries from the proposals; no denoising).
        with_coord_feat: positive queries also embed the co-head's feature at their anchor
            (see `CoDinoTransformer`).
        proposal_classes: `per_class` or `class_agnostic` encoder proposals (`CoDinoTransformer`).
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        nheads: int,
        num_feature_levels: int,
        enc_layers: int,
        dec_layers: int,
        dim_feedforward: int,
        dropout: float,
        enc_n_points: int,
        dec_n_points: int,
        num_queries: int,
        two_stage_type: str,
        embed_init_tgt: bool,
        decoder_sa_type: str,
        fix_refpoints_hw: float,
        pre_norm: bool,
        use_dn: bool,
        dn_number: int,
        dn_box_noise_scale: float,
        dn_label_noise_ratio: float,
        num_co_heads: int,
        activation_checkpoint: bool,
        decoder_query_pos: str = "ref_point_head",
        with_coord_feat: bool = False,
        proposal_classes: str = "per_class",
    ) -> None:
        super().__init__()
        if decoder_query_pos == "proposal" and use_dn:
            raise ValueError("decoder_query_pos='proposal' has no positional queries for denoising "
                             "queries: set use_dn=False (Co-Deformable-DETR trains without)")
        self.num_classes = num_classes
        self.dec_layers = dec_layers
        self.two_stage_type = two_stage_type
        self.use_dn = use_dn
        self.dn_number = dn_number
        self.dn_box_noise_scale = dn_box_noise_scale
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.transformer = CoDinoTransformer(
            num_classes, hidden_dim, nheads, num_feature_levels, enc_layers, dec_layers,
            dim_feedforward, dropout, enc_n_points, dec_n_points, num_queries, two_stage_type,
            embed_init_tgt, decoder_sa_type, fix_refpoints_hw, pre_norm, num_co_heads,
            activation_checkpoint, decoder_query_pos, with_coord_feat, proposal_classes,
        )
        num_branches = dec_layers + (1 if two_stage_type == "standard" else 0)
        self.cls_branches = nn.ModuleList([nn.Linear(hidden_dim, num_classes) for _ in range(num_branches)])
        self.reg_branches = nn.ModuleList([MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_branches)])
        self.label_embedding = nn.Embedding(num_classes, hidden_dim) if use_dn else None
        self.downsample: Optional[nn.Sequential] = None
        if num_co_heads > 0:
            self.downsample = nn.Sequential(
                nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(math.gcd(32, hidden_dim), hidden_dim),
            )
        self.reset_branches()

    def reset_branches(self) -> None:
        """Class bias at the 0.01 prior, last box layer zero (queries start on their references)."""
        bias = -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB)
        for branch in self.cls_branches:
            nn.init.constant_(branch.bias, bias)
        for branch in self.reg_branches:
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)

    def _predict(self, layer: int, hidden: Tensor, reference: Tensor) -> dict[str, Tensor]:
        """Layer `layer`'s `{pred_logits [B, N, C], pred_boxes [B, N, 4] cxcywh}`.

        The box refines the layer's INPUT reference as the decoder hands it, undetached ("look
        forward twice": the loss also trains the previous layer's box branch), with the
        decoder's `refine_eps`."""
        delta = self.reg_branches[layer](hidden)
        return {
            "pred_logits": self.cls_branches[layer](hidden),
            "pred_boxes": (delta + inverse_sigmoid(reference, self.transformer.decoder.refine_eps)).sigmoid(),
        }

    def forward(
        self,
        mlvl_feats: Sequence[Tensor],
        mlvl_masks: Sequence[Tensor],
        mlvl_pos: Sequence[Tensor],
        targets: Optional[Sequence[dict[str, Tensor]]] = None,
    ) -> dict[str, Any]:
        """Encodes, selects queries, decodes.

        Args:
            mlvl_feats: L maps `[B, D, H_l, W_l]` (neck output).
            mlvl_masks: L masks `[B, H_l, W_l]` bool, True on padding.
            mlvl_pos: L position encodings `[B, D, H_l, W_l]`.
            targets: B dicts with `labels` `[n_i]` and `boxes` `[n_i, 4]` cxcywh normalised; only
                read in training (denoising).

        Returns:
            `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` cxcywh normalised (last layer),
            `memory` (`EncoderMemory`); in training with targets also `aux_outputs` (first
            dec_layers - 1 layers), `interm_outputs` (`standard` only: the encoder proposals'
            `TopKProposals.loss_outputs`), and `dn_outputs` `{pred_logits [B, pad, C], pred_boxes, aux_outputs,
            dn_meta}` when `use_dn` and the batch has at least one gt box.
        """
        return self.finish(self.prepare(mlvl_feats, mlvl_masks, mlvl_pos, targets))[0]

    def prepare(
        self,
        mlvl_feats: Sequence[Tensor],
        mlvl_masks: Sequence[Tensor],
        mlvl_pos: Sequence[Tensor],
        targets: Optional[Sequence[dict[str, Tensor]]] = None,
    ) -> dict[str, Any]:
        """First half of `forward`: encoder, query selection, denoising queries (no decoder).

        The co-heads run on its memory and hand their positive queries to `finish`.

        Returns:
            `{memory, content [B, N, D], reference_unsig [B, N, 4], topk, dn, training}`
            (N = denoising pad + matching queries; `topk` / `dn` None when absent).
        """
        memory = self.transformer.encode(mlvl_feats, mlvl_masks, mlvl_pos)
        enc_cls = self.cls_branches[-1] if self.two_stage_type == "standard" else None
        enc_reg = self.reg_branches[-1] if self.two_stage_type == "standard" else None
        content, reference_unsig, topk = self.transformer.select_queries(memory, enc_cls, enc_reg)
        training = self.training and targets is not None
        dn = None if not (training and self.use_dn) else build_denoising_queries(
            targets, self.label_embedding, self.num_classes, content.shape[1], self.dn_number,
            self.dn_label_noise_ratio, self.dn_box_noise_scale)
        if dn is not None:
            content = torch.cat([dn.content, content], 1)
            reference_unsig = torch.cat([dn.reference_unsig, reference_unsig], 1)
        return {"memory": memory, "content": content, "reference_unsig": reference_unsig,
                "topk": topk, "dn": dn, "training": training}

    def finish(self, prepared: dict[str, Any], positive_boxes: Sequence[Tensor] = (),
               positive_feats: Sequence[Optional[Tensor]] = ()
               ) -> tuple[dict[str, Any], list[list[dict[str, Tensor]]]]:
        """Second half of `forward`: one decoder call for all query groups, then the branches.

        Args:
            prepared: `prepare`'s output.
            positive_boxes: per co-head k (training only) `[B, N_k, 4]` cxcywh normalised
                positive boxes, as `forward_positive` takes them; decoded in the same call as
                the matching queries, each group attending only to itself
                (`codetr/model/joint_queries.py`), so the results equal `forward_positive`'s up
                to floating-point summation order.
            positive_feats: per co-head k `[B, N_k, D]` features at the positives
                (`with_coord_feat`), or empty / Nones.

        Returns:
            `(out, positive_layers)`: `out` as `forward`; `positive_layers[k]` as
            `forward_positive(memory, positive_boxes[k], k, positive_feats[k])`.
        """
        memory, topk, dn = prepared["memory"], prepared["topk"], prepared["dn"]
        training = prepared["training"]
        reference = prepared["reference_unsig"].sigmoid()
        groups = [(prepared["content"], reference, None if topk is None else topk.query_pos)]
        feats = list(positive_feats) or [None] * len(positive_boxes)
        for k, (boxes, pos_feats) in enumerate(zip(positive_boxes, feats, strict=True)):
            boxes = boxes.detach()
            # As forward_positive: clamped boxes embedded, raw boxes as the first reference.
            clamped = inverse_sigmoid(boxes).sigmoid()
            groups.append((self.transformer.positive_content(clamped, k, pos_feats), boxes,
                           self.transformer.positive_query_pos(clamped, k)))
        sizes = [g[0].shape[1] for g in groups]
        attn_mask = None if dn is None else dn.attn_mask
        if len(groups) > 1:
            attn_mask = block_attn_mask(sizes, attn_mask, reference.device)
        query_pos = concat_groups([g[2] for g in groups])
        hidden, references = self.transformer.decoder(
            torch.cat([g[0] for g in groups], 1), torch.cat([g[1] for g in groups], 1),
            memory.memory, memory.memory_mask, memory.spatial_shapes, memory.level_start_index,
            memory.valid_ratios, self.reg_branches[: self.dec_layers], attn_mask, query_pos,
        )
        # At inference only the last layer's predictions are needed.
        layers = range(self.dec_layers) if training or positive_boxes else [self.dec_layers - 1]
        joint = [self._predict(lid, hidden[lid], references[lid]) for lid in layers]
        per_group = [{k: split_groups(v, sizes) for k, v in p.items()} for p in joint]
        per_layer = [{k: v[0] for k, v in p.items()} for p in per_group]
        positive_layers = [[{k: v[g] for k, v in p.items()} for p in per_group]
                           for g in range(1, len(groups))]
        pad = 0 if dn is None else dn.meta["pad_size"]
        matching = [{k: v[:, pad:] for k, v in p.items()} for p in per_layer]
        out: dict[str, Any] = dict(matching[-1])
        out["memory"] = memory
        if not training:
            return out, positive_layers
        out["aux_outputs"] = matching[:-1]
        if topk is not None:
            out["interm_outputs"] = topk.loss_outputs()
        if dn is not None:
            denoising = [{k: v[:, :pad] for k, v in p.items()} for p in per_layer]
            out["dn_outputs"] = dict(denoising[-1], aux_outputs=denoising[:-1], dn_meta=dict(dn.meta))
        return out, positive_layers

    def aux_feature_maps(self, memory: EncoderMemory) -> list[Tensor]:
        """The memory as maps for the co-heads: the L levels plus one stride-2 downsampled level.

        Not detached: the co-heads' losses train the encoder (the point of Co-DETR).

        Args:
            memory: the encoder memory.

        Returns:
            L + 1 maps `[B, D, H_l, W_l]`, the last `downsample(map L-1)`.
        """
        if self.downsample is None:
            raise RuntimeError("aux_feature_maps needs num_co_heads > 0")
        maps = memory.level_maps()
        return maps + [self.downsample(maps[-1])]

    def forward_positive(self, memory: EncoderMemory, pos_boxes: Tensor, head_index: int,
                         pos_feats: Optional[Tensor] = None) -> list[dict[str, Tensor]]:
        """Decoder pass of one co-head's customized positive queries (training only).

        Same decoder and branches as the matching queries; no denoising, no attention mask.

        Args:
            memory: the encoder memory (gradients flow back into it).
            pos_boxes: `[B, N, 4]` cxcywh normalised positive boxes (not clamped: w or h may exceed
                1): the queries' references.
            head_index: co-head index `k` (selects `aux_pos_trans[k]`).
            pos_feats: `[B, N, D]` features at the positives (`with_coord_feat`) or None.

        Returns:
            Per decoder layer `{pred_logits [B, N, C], pred_boxes [B, N, 4] cxcywh}`.
        """
        pos_boxes = pos_boxes.detach()
        # mmdet's forward_aux embeds the boxes clamped into [1e-5, 1 - 1e-5] (content; the fixed
        # query_pos of `proposal`) but takes them AS THEY ARE as the first reference: an anchor
        # wider than the image (w > 1) keeps its sampling points and query_pos (parity fix 4).
        clamped = inverse_sigmoid(pos_boxes).sigmoid()
        content = self.transformer.positive_content(clamped, head_index, pos_feats)
        hidden, references = self.transformer.decoder(
            content, pos_boxes, memory.memory, memory.memory_mask, memory.spatial_shapes,
            memory.level_start_index, memory.valid_ratios, self.reg_branches[: self.dec_layers], None,
            self.transformer.positive_query_pos(clamped, head_index),
        )
        return [self._predict(lid, hidden[lid], references[lid]) for lid in range(self.dec_layers)]
