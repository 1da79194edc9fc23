"""Deformable transformer encoder: multi-scale deformable self-attention over all levels.

State-dict names (mmdet Co-DINO): `layers.{i}.attentions.0.*` (deformable attention),
`layers.{i}.ffns.0.layers.{0.0,1}.*`, `layers.{i}.norms.{0,1}.*` and, with `pre_norm`, `norm.*`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.model.deformable_attention import MultiScaleDeformableAttention
from codetr.model.geometry_memo import GeometryMemo
from codetr.model.mlp import FFN

_REFERENCES = GeometryMemo()  # encoder_reference_points of unpadded batches, eager CPU inference


class EncoderLayer(nn.Module):
    """Post-norm layer: `x = norm0(x + attn(x + pos))`, `x = norm1(ffn(x))` (FFN has the residual).

    Args:
        embed_dim: features `D`.
        num_heads: attention heads.
        num_levels: feature levels `L`.
        num_points: sampling points per head and level.
        feedforward_dim: hidden features of the FFN.
        dropout: dropout after the attention and inside the FFN.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        feedforward_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)]
        )
        self.ffns = nn.ModuleList([FFN(embed_dim, feedforward_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)])
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Optional[Tensor],
    ) -> Tensor:
        """One encoder layer.

        Args:
            src: `[B, S, D]` flattened features of all levels.
            pos: `[B, S, D]` position + level embedding.
            reference_points: `[B, S, L, 2]` normalised `(x, y)` pixel centres per level.
            spatial_shapes: `[L, 2]` int64 `(h, w)`.
            level_start_index: `[L]` int64.
            key_padding_mask: `[B, S]` bool, True on padding, or None.

        Returns:
            `[B, S, D]`.
        """
        attn = self.attentions[0](
            src + pos, reference_points, src, spatial_shapes, level_start_index, key_padding_mask
        )
        src = self.norms[0](src + self.dropout(attn))
        return self.norms[1](self.ffns[0](src))


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised by the valid (unpadded) extent of each image.

    Args:
        spatial_shapes: `[L, 2]` int64 `(h, w)`.
        valid_ratios: `[B, L, 2]` `(w_valid / w, h_valid / h)` per level.

    Returns:
        `[B, S, L, 2]` `(x, y)` in the padded map of each level (centre / valid size x valid ratio
        of the sampled level), `S = sum(h * w)`.
    """
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # arange + 0.5, not linspace(0.5, h - 0.5, h): the same values, but linspace exports to
        # ONNX as (end - start) / (steps - 1), which is 0 / 0 = NaN for a level 1 pixel tall
        kw = dict(dtype=valid_ratios.dtype, device=valid_ratios.device)
        ref_y, ref_x = torch.meshgrid(torch.arange(h, **kw) + 0.5, torch.arange(w, **kw) + 0.5,
                                      indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference = torch.cat(points, 1)  # [B, S, 2] normalised by the valid size
    return reference[:, :, None] * valid_ratios[:, None]


class Encoder(nn.Module):
    """Stack of `num_layers` `EncoderLayer`s.

    Args:
        embed_dim: features `D`.
        num_heads: attention heads.
        num_levels: feature levels `L`.
        num_points: sampling points per head and level.
        feedforward_dim: hidden features of the FFN.
        dropout: dropout probability.
        num_layers: number of layers.
        pre_norm: TAO/DINO's `pre_norm` (`normalize_before`): the layers stay post-norm and one
            extra LayerNorm (`norm`) is applied to the encoder output, exactly as TAO's
            `TransformerEncoder(norm=LayerNorm if normalize_before)` does.
        activation_checkpoint: in training, recompute each layer in backward instead of keeping
            its activations (`torch.utils.checkpoint`, non-reentrant) to save memory.
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
        pre_norm: bool,
        activation_checkpoint: bool,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                EncoderLayer(embed_dim, num_heads, num_levels, num_points, feedforward_dim, dropout)
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim) if pre_norm else None
        self.activation_checkpoint = activation_checkpoint

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        key_padding_mask: Optional[Tensor],
    ) -> Tensor:
        """Encodes the flattened multi-scale features.

        Args:
            src: `[B, S, D]`.
            pos: `[B, S, D]` position + level embedding.
            spatial_shapes: `[L, 2]` int64 `(h, w)`.
            level_start_index: `[L]` int64.
            valid_ratios: `[B, L, 2]` `(w, h)` valid fractions.
            key_padding_mask: `[B, S]` bool, True on padding, or None.

        Returns:
            memory `[B, S, D]`.
        """
        reference_points = _REFERENCES.cached(  # eager CPU inference without padding: valid ratios 1
            key_padding_mask,
            lambda: (src.shape[0], tuple(map(tuple, spatial_shapes.tolist())), valid_ratios.dtype),
            lambda: encoder_reference_points(spatial_shapes, valid_ratios))
        use_checkpoint = self.activation_checkpoint and self.training and torch.is_grad_enabled()
        output = src
        for layer in self.layers:
            args = (output, pos, reference_points, spatial_shapes, level_start_index, key_padding_mask)
            if use_checkpoint:
                output = checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
        if self.norm is not None:
            output = self.norm(output)
        return output
