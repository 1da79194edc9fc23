"""The Co-DINO transformer: encoder, query selection, decoder and positive-query embedding.

State-dict names (under `query_head.transformer.`, as in the official Co-DINO checkpoints):
`level_embeds` `[L, D]`, `encoder.*` (see `encoder.py`), `decoder.*` (see `decoder.py`),
`enc_output.*` + `enc_output_norm.*` (two-stage only), `query_embed.weight` `[Q, D]` (content
queries; absent for two-stage with `embed_init_tgt=False`), `refpoint_embed.weight` (+ `hw_embed`)
(`two_stage_type="no"` only, DINO's names), `aux_pos_trans.{k}.*` + `aux_pos_trans_norm.{k}.*`
(one per co-head), with `with_coord_feat` also `pos_feats_trans.{k}.*` + `pos_feats_norm.{k}.*`
and (Co-Deformable-DETR) `head_pos_embed.weight` `[K, 1]`.

The class/box branches are the query head's (`cls_branches`, `reg_branches`); the transformer
receives them in `select_queries` and `decode`, as mmdet's transformer does.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from codetr.model.decoder import Decoder
from codetr.model.deformable_attention import MultiScaleDeformableAttention
from codetr.model.encoder import Encoder
from codetr.model.encoder_memory import EncoderMemory, valid_ratios_of
from codetr.model.learned_references import (init_reference_embeddings, learned_references,
                                             reference_embeddings)
from codetr.model.proposal_queries import box_queries, xywh_sine_embed
from codetr.model.two_stage import PROPOSAL_CLASSES, TopKProposals, encoder_proposals, select_topk_proposals


class CoDinoTransformer(nn.Module):
    """Deformable encoder + DINO query selection + refining decoder.

    Args:
        num_classes: class count (sizes the `ca_label` keys only).
        hidden_dim: features `D`.
        nheads: attention heads.
        num_feature_levels: levels `L`.
        enc_layers: encoder layers.
        dec_layers: decoder layers.
        dim_feedforward: FFN hidden features.
        dropout: dropout probability.
        enc_n_points: encoder sampling points per head and level.
        dec_n_points: decoder sampling points per head and level.
        num_queries: matching queries `Q`.
        two_stage_type: `standard` (queries from the top-k encoder proposals) or `no` (learned
            reference boxes).
        embed_init_tgt: content queries are the learned `query_embed` (True) or the selected
            memory, detached (False); `standard` only (`no` always learns them).
        decoder_sa_type: `sa`, `ca_label` or `ca_content`.
        fix_refpoints_hw: `no` only, as DINO: -1 learns (cx, cy, w, h) per query; -2 learns
            (cx, cy) per query (initialised uniformly, as DINO) and one (w, h) shared by all
            queries; a value > 0 fixes w = h to it (cx, cy learned); as in DINO the value
            goes through the clamped inverse sigmoid, so values >= 1 mean whole-image boxes.
        pre_norm: LayerNorm on the encoder output (see `Encoder`).
        num_co_heads: auxiliary heads; one `aux_pos_trans` projection each.
        activation_checkpoint: recompute the encoder layers in backward.
        decoder_query_pos: `ref_point_head` (DINO: positional queries from each layer's refined
            box) or `proposal` (Deformable DETR: from the selected proposals through
            `pos_trans`, fixed for all layers; `standard` two-stage only).
        with_coord_feat: Co-DETR's anchor features: a positive query's content also gets
            `pos_feats_norm[k](pos_feats_trans[k](feature at its anchor))` (Linear D -> D,
            LayerNorm D), and with `proposal` its positional query the learned scalar
            `head_pos_embed.weight[k]` (an `nn.Embedding(K, 1)`, the authors' kept "bug").
        proposal_classes: how `standard` ranks the encoder proposals and what the intermediate
            loss sees (`codetr.model.two_stage`): `per_class` (DINO) or `class_agnostic`
            (Deformable DETR).
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
        num_co_heads: int,
        activation_checkpoint: bool,
        decoder_query_pos: str = "ref_point_head",
        with_coord_feat: bool = False,
        proposal_classes: str = "per_class",
    ) -> None:
        super().__init__()
        if proposal_classes not in PROPOSAL_CLASSES:
            raise ValueError(f"proposal_classes must be one of {PROPOSAL_CLASSES}, got {proposal_classes!r}")
        if two_stage_type not in ("standard", "no"):
            raise ValueError(f"two_stage_type must be 'standard' or 'no', got {two_stage_type!r}")
        if decoder_query_pos == "proposal" and two_stage_type != "standard":
            raise ValueError("decoder_query_pos='proposal' needs two_stage_type='standard'")
        self.proposal_pos = decoder_query_pos == "proposal"
        self.proposal_classes = proposal_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.two_stage_type = two_stage_type
        self.embed_init_tgt = embed_init_tgt
        self.fix_refpoints_hw = fix_refpoints_hw
        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, hidden_dim))
        self.encoder = Encoder(
            hidden_dim, nheads, num_feature_levels, enc_n_points, dim_feedforward, dropout,
            enc_layers, pre_norm, activation_checkpoint,
        )
        self.decoder = Decoder(
            hidden_dim, nheads, num_feature_levels, dec_n_points, dim_feedforward, dropout,
            dec_layers, decoder_sa_type, num_classes, decoder_query_pos,
        )
        self.query_embed: Optional[nn.Embedding] = None
        self.enc_output: Optional[nn.Linear] = None
        self.enc_output_norm: Optional[nn.LayerNorm] = None
        self.refpoint_embed: Optional[nn.Embedding] = None
        self.hw_embed: Optional[nn.Embedding] = None
        if two_stage_type == "standard":
            self.enc_output = nn.Linear(hidden_dim, hidden_dim)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)
            if embed_init_tgt:
                self.query_embed = nn.Embedding(num_queries, hidden_dim)
        else:
            self.query_embed = nn.Embedding(num_queries, hidden_dim)
            self.refpoint_embed, self.hw_embed = reference_embeddings(num_queries, fix_refpoints_hw)
        # Co-DINO's positive queries get content only (D); Co-Deformable-DETR's pos + content (2D).
        aux_dim = 2 * hidden_dim if self.proposal_pos else hidden_dim
        self.aux_pos_trans = nn.ModuleList([nn.Linear(2 * hidden_dim, aux_dim) for _ in range(num_co_heads)])
        self.aux_pos_trans_norm = nn.ModuleList([nn.LayerNorm(aux_dim) for _ in range(num_co_heads)])
        if self.proposal_pos:
            self.pos_trans = nn.Linear(2 * hidden_dim, 2 * hidden_dim)
            self.pos_trans_norm = nn.LayerNorm(2 * hidden_dim)
        self.with_coord_feat = with_coord_feat and num_co_heads > 0
        self.pos_feats_trans: Optional[nn.ModuleList] = None
        self.pos_feats_norm: Optional[nn.ModuleList] = None
        self.head_pos_embed: Optional[nn.Embedding] = None
        if self.with_coord_feat:
            heads = range(num_co_heads)
            self.pos_feats_trans = nn.ModuleList([nn.Linear(hidden_dim, hidden_dim) for _ in heads])
            self.pos_feats_norm = nn.ModuleList([nn.LayerNorm(hidden_dim) for _ in heads])
            if self.proposal_pos:
                self.head_pos_embed = nn.Embedding(num_co_heads, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINO's init: Xavier for every matrix, then the deformable attention's own init."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embeds)
        if self.query_embed is not None:
            nn.init.normal_(self.query_embed.weight)
        if self.refpoint_embed is not None:
            init_reference_embeddings(self.refpoint_embed, self.hw_embed)

    def encode(
        self, mlvl_feats: Sequence[Tensor], mlvl_masks: Sequence[Tensor], mlvl_pos: Sequence[Tensor]
    ) -> EncoderMemory:
        """Flattens the levels, adds the level embeddings to the positions and encodes.

        Args:
            mlvl_feats: L maps `[B, D, H_l, W_l]`.
            mlvl_masks: L masks `[B, H_l, W_l]` bool, True on padding.
            mlvl_pos: L position encodings `[B, D, H_l, W_l]`.

        Returns:
            The encoder memory.
        """
        feats, masks, pos = [], [], []
        shapes = []
        for lvl, (feat, mask, pe) in enumerate(zip(mlvl_feats, mlvl_masks, mlvl_pos)):
            shapes.append(feat.shape[-2:])
            feats.append(feat.flatten(2).transpose(1, 2))
            masks.append(mask.flatten(1))
            pos.append(pe.flatten(2).transpose(1, 2) + self.level_embeds[lvl].view(1, 1, -1))
        device = mlvl_feats[0].device
        spatial_shapes = torch.as_tensor([tuple(s) for s in shapes], dtype=torch.long, device=device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratios_of(m) for m in mlvl_masks], 1).to(mlvl_feats[0].dtype)
        memory_mask = torch.cat(masks, 1)
        memory = self.encoder(
            torch.cat(feats, 1), torch.cat(pos, 1), spatial_shapes, level_start_index, valid_ratios, memory_mask
        )
        return EncoderMemory(memory, memory_mask, spatial_shapes, level_start_index, valid_ratios)

    def select_queries(
        self, memory: EncoderMemory, enc_cls_branch: nn.Module, enc_reg_branch: nn.Module
    ) -> tuple[Tensor, Tensor, Optional[TopKProposals]]:
        """Initial matching queries.

        Args:
            memory: the encoder memory.
            enc_cls_branch: encoder class branch `[..., D] -> [..., C]` (`standard` only).
            enc_reg_branch: encoder box branch `[..., D] -> [..., 4]` (`standard` only).

        Returns:
            `(content [B, K, D], reference_unsig [B, K, 4] detached inverse-sigmoid cxcywh,
            topk)`; `topk` holds the encoder proposals for the intermediate loss (`standard`)
            or is None (`no`). K = Q, or S if the memory has fewer locations.
        """
        batch = memory.memory.shape[0]
        if self.two_stage_type == "standard":
            output_memory, proposals = encoder_proposals(memory.memory, memory.memory_mask, memory.spatial_shapes)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            topk = select_topk_proposals(output_memory, proposals, enc_cls_branch, enc_reg_branch,
                                         self.num_queries, self.proposal_classes)
            k = topk.content.shape[1]
            content = topk.content.detach()
            if self.proposal_pos:  # Deformable DETR: both halves from the detached proposal boxes
                topk.query_pos, content = box_queries(topk.boxes_unsig.detach().sigmoid(),
                                                      self.pos_trans, self.pos_trans_norm)
            if self.query_embed is not None:
                content = self.query_embed.weight[None, :k].expand(batch, -1, -1)
            return content, topk.boxes_unsig.detach(), topk
        content = self.query_embed.weight[None].expand(batch, -1, -1)
        return content, self._learned_references()[None].expand(batch, -1, -1), None

    def _learned_references(self) -> Tensor:
        """`[Q, 4]` inverse-sigmoid reference boxes of `two_stage_type="no"`."""
        return learned_references(self.refpoint_embed, self.hw_embed, self.fix_refpoints_hw)

    def decode(
        self,
        content: Tensor,
        reference_unsig: Tensor,
        memory: EncoderMemory,
        reg_branches: Sequence[nn.Module],
        attn_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Runs the decoder; see `Decoder.forward` for the returned lists.

        Args:
            content: `[B, N, D]` content queries.
            reference_unsig: `[B, N, 4]` inverse-sigmoid cxcywh reference boxes.
            memory: the encoder memory.
            reg_branches: the first `dec_layers` box branches.
            attn_mask: `[N, N]` bool self-attention mask (True = blocked) or None.
            query_pos: `[B, N, D]` fixed positional queries (`decoder_query_pos="proposal"`).
        """
        return self.decoder(
            content,
            reference_unsig.sigmoid(),
            memory.memory,
            memory.memory_mask,
            memory.spatial_shapes,
            memory.level_start_index,
            memory.valid_ratios,
            reg_branches,
            attn_mask,
            query_pos,
        )

    def positive_query_pos(self, boxes: Tensor, head_index: int) -> Optional[Tensor]:
        """`[B, N, D]` positional queries of positive boxes (`proposal` only; DINO: None), plus
        `head_pos_embed.weight[k]` with `with_coord_feat` (mmdet's `forward_aux`)."""
        if not self.proposal_pos:
            return None
        query_pos = box_queries(boxes, self.aux_pos_trans[head_index], self.aux_pos_trans_norm[head_index])[0]
        if self.with_coord_feat:
            query_pos = query_pos + self.head_pos_embed.weight[head_index]
        return query_pos

    def positive_content(self, boxes: Tensor, head_index: int, feats: Optional[Tensor] = None) -> Tensor:
        """Content of customized positive queries: `LayerNorm(Linear(sine_embed(box)))`, plus
        `pos_feats_norm[k](pos_feats_trans[k](feats))` with `with_coord_feat`.

        The sine embedding uses `D / 2` features per coordinate in mmdet's (cx, cy, w, h) block
        order, temperature 10000 (`get_proposal_pos_embed`).

        Args:
            boxes: `[B, N, 4]` cxcywh normalised.
            head_index: which co-head's projection to use.
            feats: `[B, N, D]` the co-head's feature at each positive (`build_positive_queries`);
                given exactly when `with_coord_feat`.

        Returns:
            `[B, N, D]`.
        """
        if (feats is not None) != self.with_coord_feat:
            raise ValueError(f"with_coord_feat={self.with_coord_feat} but the positives' features "
                             f"are {'given' if feats is not None else 'missing'}")
        trans, norm = self.aux_pos_trans[head_index], self.aux_pos_trans_norm[head_index]
        if self.proposal_pos:
            content = box_queries(boxes, trans, norm)[1]
        else:
            content = norm(trans(xywh_sine_embed(boxes, self.hidden_dim // 2).to(trans.weight.dtype)))
        if feats is not None:
            content = content + self.pos_feats_norm[head_index](self.pos_feats_trans[head_index](feats))
        return content
