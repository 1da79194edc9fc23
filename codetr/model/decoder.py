"""DINO deformable decoder with iterative box refinement ("look forward twice").

State-dict names (mmdet Co-DINO): `layers.{i}.attentions.0.attn.*` (self-attention,
`nn.MultiheadAttention`; with `decoder_sa_type="ca_content"` `attentions.0` is a deformable
attention instead), `layers.{i}.attentions.1.*` (deformable cross-attention),
`layers.{i}.ffns.0.*`, `layers.{i}.norms.{0,1,2}.*`, `ref_point_head.{0,2}.*`, `norm.*` and, for
`ca_label` only, `sa_label_embedding.weight`. With `query_pos_source="proposal"` (Deformable DETR,
Co-Deformable-DETR) the positional queries come from outside, fixed for every layer, and there is
neither `ref_point_head` nor the final `norm` (mmdet's `DeformableDetrTransformerDecoder`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from codetr.boxes import DEFORMABLE_REFINE_EPS, REFINE_EPS, inverse_sigmoid
from codetr.model.deformable_attention import MultiScaleDeformableAttention
from codetr.model.mlp import FFN, MLP
from codetr.model.position_encoding import sine_embed_boxes

SA_TYPES = ("sa", "ca_label", "ca_content")
QUERY_POS_SOURCES = ("ref_point_head", "proposal")


class SelfAttention(nn.Module):
    """`nn.MultiheadAttention` under the name `attn` (mmcv's wrapper layout), batch first.

    Args:
        embed_dim: features `D`.
        num_heads: attention heads.
        dropout: dropout on the attention weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """`[B, Nq, D]` x `[B, Nk, D]` -> `[B, Nq, D]`; `attn_mask` `[Nq, Nk]` bool, True = blocked."""
        return self.attn(query, key, value, attn_mask=attn_mask, need_weights=False)[0]


class DecoderLayer(nn.Module):
    """Self-attention -> norm0 -> deformable cross-attention -> norm1 -> FFN -> norm2.

    Args:
        embed_dim: features `D`.
        num_heads: attention heads.
        num_levels: feature levels `L`.
        num_points: sampling points per head and level.
        feedforward_dim: hidden features of the FFN.
        dropout: dropout probability.
        sa_type: DINO's `decoder_sa_type`: `sa` (queries attend to each other, q = k = tgt + pos),
            `ca_label` (queries attend to the class label embeddings), `ca_content` (a second
            deformable attention over the memory).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        feedforward_dim: int,
        dropout: float,
        sa_type: str,
    ) -> None:
        super().__init__()
        if sa_type not in SA_TYPES:
            raise ValueError(f"decoder_sa_type must be one of {SA_TYPES}, got {sa_type!r}")
        self.sa_type = sa_type
        first: nn.Module
        if sa_type == "ca_content":
            first = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        else:
            first = SelfAttention(embed_dim, num_heads, dropout)
        cross = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.attentions = nn.ModuleList([first, cross])
        self.ffns = nn.ModuleList([FFN(embed_dim, feedforward_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(3)])
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        self_attn_mask: Optional[Tensor],
        label_embedding: Optional[Tensor],
    ) -> Tensor:
        """One decoder layer.

        Args:
            tgt: `[B, Nq, D]` content queries.
            query_pos: `[B, Nq, D]` positional queries (from the reference boxes).
            reference_points: `[B, Nq, L, 4]` cxcywh boxes scaled by each level's valid ratios.
            memory: `[B, S, D]` encoder output.
            memory_mask: `[B, S]` bool, True on padding, or None.
            spatial_shapes: `[L, 2]` int64 `(h, w)`.
            level_start_index: `[L]` int64.
            self_attn_mask: `[Nq, Nq]` bool, True = query i may not attend to j (denoising), or
                None. Only `sa` uses it: the other types attend to keys that carry no ground
                truth (label embeddings, memory), so nothing can leak.
            label_embedding: `[C, D]` keys/values of `ca_label`, else None.

        Returns:
            `[B, Nq, D]`.
        """
        if self.sa_type == "sa":
            q = tgt + query_pos
            sa = self.attentions[0](q, q, tgt, self_attn_mask)
        elif self.sa_type == "ca_label":
            labels = label_embedding[None].expand(tgt.shape[0], -1, -1)
            sa = self.attentions[0](tgt, labels, labels, None)
        else:
            sa = self.attentions[0](
                tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_mask
            )
        tgt = self.norms[0](tgt + self.dropout(sa))
        ca = self.attentions[1](
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_mask
        )
        tgt = self.norms[1](tgt + self.dropout(ca))
        return self.norms[2](self.ffns[0](tgt))


class Decoder(nn.Module):
    """`num_layers` decoder layers refining 4-d reference boxes layer after layer.

    Args:
        embed_dim: features `D` (even; the box sine embedding has `2 * D` features).
        num_heads: attention heads.
        num_levels: feature levels `L`.
        num_points: sampling points per head and level.
        feedforward_dim: hidden features of the FFN.
        dropout: dropout probability.
        num_layers: number of layers.
        sa_type: `sa`, `ca_label` or `ca_content` (see `DecoderLayer`).
        num_classes: class count; sizes the `ca_label` keys (unused otherwise).
        query_pos_source: `ref_point_head` (DINO: each layer's positional queries are
            `ref_point_head(sine(reference box))`, recomputed as the boxes are refined; outputs
            pass a final LayerNorm) or `proposal` (Deformable DETR: `forward` receives them and
            they stay fixed; no final norm).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        feedforward_dim: int,
        dropout: float,
        num_layers: int,
        sa_type: str,
        num_classes: int,
        query_pos_source: str = "ref_point_head",
    ) -> None:
        super().__init__()
        if query_pos_source not in QUERY_POS_SOURCES:
            raise ValueError(f"query_pos_source must be one of {QUERY_POS_SOURCES}, got {query_pos_source!r}")
        self.embed_dim = embed_dim
        self.layers = nn.ModuleList(
            [
                DecoderLayer(embed_dim, num_heads, num_levels, num_points, feedforward_dim, dropout, sa_type)
                for _ in range(num_layers)
            ]
        )
        dino = query_pos_source == "ref_point_head"
        self.ref_point_head: Optional[MLP] = MLP(2 * embed_dim, embed_dim, embed_dim, 2) if dino else None
        self.norm: nn.Module = nn.LayerNorm(embed_dim) if dino else nn.Identity()
        # Both "look forward twice" (references returned undetached, see forward): DINO, and
        # Sense-X's Co-Deformable-DETR config (`look_forward_twice=True`). The inverse_sigmoid
        # eps differs: DINO's 1e-3, Deformable DETR's (mmdet's default) 1e-5.
        self.refine_eps = REFINE_EPS if dino else DEFORMABLE_REFINE_EPS
        # DINO shares one label embedding between all ca_label layers.
        self.sa_label_embedding = nn.Embedding(num_classes, embed_dim) if sa_type == "ca_label" else None

    def forward(
        self,
        query: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor],
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        reg_branches: Sequence[nn.Module],
        self_attn_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Runs the layers; after each, `reg_branches[l]` refines the reference boxes.

        Args:
            query: `[B, Nq, D]` initial content queries.
            reference_boxes: `[B, Nq, 4]` initial cxcywh boxes in [0, 1] (normalised by the
                unpadded image size).
            memory: `[B, S, D]`.
            memory_mask: `[B, S]` bool, True on padding, or None.
            spatial_shapes: `[L, 2]` int64.
            level_start_index: `[L]` int64.
            valid_ratios: `[B, L, 2]` `(w, h)` valid fractions.
            reg_branches: at least `num_layers` box branches `[..., D] -> [..., 4]` (deltas in
                inverse-sigmoid space).
            self_attn_mask: `[Nq, Nq]` bool, True = blocked, or None.
            query_pos: `[B, Nq, D]` positional queries for every layer (`proposal` source only;
                required there, ignored otherwise).

        Returns:
            `(hidden_states, references)`: `hidden_states[l]` `[B, Nq, D]` is the normed output of
            layer `l`; `references[0]` is `reference_boxes` and `references[l + 1]` the box refined
            after layer `l` (`[B, Nq, 4]` cxcywh in [0, 1], NOT detached: the loss of layer
            `l + 1` reaches `reg_branches[l]` through it, "look forward twice"). The next layer
            itself samples around the detached copy.
        """
        if self.ref_point_head is None and query_pos is None:
            raise ValueError("this decoder takes its positional queries from the proposals: pass query_pos")
        label_embedding = None if self.sa_label_embedding is None else self.sa_label_embedding.weight
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        output = query
        reference = reference_boxes
        hidden_states: list[Tensor] = []
        references: list[Tensor] = [reference_boxes]
        for lid, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * scale  # [B, Nq, L, 4]
            layer_pos = query_pos
            if self.ref_point_head is not None:
                # sine_embed_boxes computes in float32; follow the queries' dtype (bf16 weights).
                sine = sine_embed_boxes(reference_input[:, :, 0], self.embed_dim // 2).to(output.dtype)
                layer_pos = self.ref_point_head(sine)
            output = layer(
                output,
                layer_pos,
                reference_input,
                memory,
                memory_mask,
                spatial_shapes,
                level_start_index,
                self_attn_mask,
                label_embedding,
            )
            new_reference = (reg_branches[lid](output) + inverse_sigmoid(reference, self.refine_eps)).sigmoid()
            reference = new_reference.detach()
            hidden_states.append(self.norm(output))
            references.append(new_reference)
        return hidden_states, references
