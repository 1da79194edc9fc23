"""Multi-scale deformable attention module (Deformable DETR, Zhu et al. 2021).

Parameter names follow mmcv's `MultiScaleDeformableAttention` (`sampling_offsets`,
`attention_weights`, `value_proj`, `output_proj`) so the official Co-DINO weights load by name.
The sampling itself is `codetr.ops.multi_scale_deformable_attention`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from codetr.model.mlp import flat_rows
from codetr.ops.msda import multi_scale_deformable_attention


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to `num_points` learned offsets around its reference on every level.

    Args:
        embed_dim: query/value features `D` (divisible by `num_heads`).
        num_heads: attention heads `H`.
        num_levels: feature levels `L`.
        num_points: sampling points `P` per head and level.

    The residual connection and the dropout are the caller's (the encoder/decoder layers).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        # Eval only (`fuse_query_projections`): both query projections stacked, not saved.
        self.register_buffer("fused_query_weight", None, persistent=False)
        self.register_buffer("fused_query_bias", None, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def fuse_query_projections(self) -> None:
        """Eval-time fusion: `sampling_offsets` and `attention_weights` read the same query, so
        one GEMM with their weights stacked computes both (`codetr.model.eval_fold`). Dropped by
        `train()`: the stacked copy would not follow the weights' updates."""
        self.fused_query_weight = torch.cat([self.sampling_offsets.weight, self.attention_weights.weight])
        self.fused_query_bias = torch.cat([self.sampling_offsets.bias, self.attention_weights.bias])

    def train(self, mode: bool = True) -> "MultiScaleDeformableAttention":
        if mode:
            self.fused_query_weight = self.fused_query_bias = None
        return super().train(mode)

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of `num_heads` directions.

        Head `h` points along angle `2 pi h / H` (scaled so the larger coordinate is 1) and its
        point `p` sits `p + 1` cells away, so the initial samples cover a growing neighbourhood;
        uniform attention weights; Xavier projections.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Samples the value maps around the references.

        Args:
            query: `[B, Nq, D]`, position embedding already added.
            reference_points: `[B, Nq, L, 2]` normalised `(x, y)` points, or `[B, Nq, L, 4]`
                normalised cxcywh boxes (offsets are then scaled by half the box size / P), both
                relative to the padded map of each level (already multiplied by valid ratios).
            value: `[B, Nk, D]` flattened levels, `Nk = sum(h_l * w_l)`.
            spatial_shapes: `[L, 2]` int64 `(h_l, w_l)`.
            level_start_index: `[L]` int64 offsets of each level in `Nk`.
            key_padding_mask: `[B, Nk]` bool, True on padding (those values are zeroed).

        Returns:
            `[B, Nq, D]`.
        """
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(flat_rows(value))  # [B*Nk, D]: fresh, not a view (flat_rows)
        if key_padding_mask is not None:
            # In place on value_proj's fresh output (addmm's backward does not read it).
            value.masked_fill_(key_padding_mask.reshape(-1, 1), 0.0)
        value = value.view(bs, num_value, heads, self.embed_dim // heads)
        if self.fused_query_weight is not None:
            both = nn.functional.linear(query, self.fused_query_weight, self.fused_query_bias)
            offsets, weights = both.split([heads * levels * points * 2, heads * levels * points], -1)
        else:
            offsets, weights = self.sampling_offsets(query), self.attention_weights(query)
        weights = weights.reshape(bs, num_query, heads, levels * points)
        weights = weights.softmax(-1).view(bs, num_query, heads, levels, points)
        # locations = reference + offsets * scale, as one multiply-add over [B, Nq, H, L*P*2]:
        # the per-(level, point, xy) factors are expanded to that last axis first, because a
        # broadcast over a trailing axis of 2 runs ~10x slower on the CPU.
        offsets = offsets.reshape(bs, num_query, heads, levels * points * 2)
        if reference_points.shape[-1] == 2:
            # Offsets are in cells of each level: divide by (w_l, h_l).
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(query.dtype)
            scale = (1.0 / normalizer)[:, None, :].expand(levels, points, 2).reshape(-1)  # [L*P*2]
            base = reference_points[:, :, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Offsets are in units of half the box size / P.
            scale = (reference_points[:, :, :, None, 2:] * (0.5 / points)).expand(
                bs, num_query, levels, points, 2).reshape(bs, num_query, 1, -1)
            base = reference_points[:, :, :, None, :2]
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        base = base.expand(bs, num_query, levels, points, 2).reshape(bs, num_query, 1, -1)
        locations = torch.addcmul(base, offsets, scale).view(bs, num_query, heads, levels, points, 2)
        # Sample in float32 (as Deformable DETR's kernel does under AMP): bf16 locations would be
        # off by up to a cell on large maps, and under autocast the inputs' dtypes would differ.
        output = multi_scale_deformable_attention(
            value.float(), spatial_shapes, level_start_index, locations.float(), weights.float()
        )
        return self.output_proj(output.to(query.dtype))
