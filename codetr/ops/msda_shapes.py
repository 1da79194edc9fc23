"""Sizes and per-level value maps of a multi-scale deformable attention call (shared by all paths).

Every path (reference, gather, packed, export, Triton) takes the same mmcv-ordered arguments
``value [B, Nk, H, D]``, ``spatial_shapes [L, 2]``, ``sampling_locations [B, Nq, H, L, P, 2]``;
this module reads their sizes once and splits ``value`` into the per-level ``[B*H, D, h, w]``
maps that ``F.grid_sample`` wants.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class MSDASizes(NamedTuple):
    """Sizes of one call: batch, keys, heads, head dim, queries, levels, points."""

    batch: int
    num_keys: int
    num_heads: int
    head_dim: int
    num_queries: int
    num_levels: int
    num_points: int


def msda_sizes(value: Tensor, sampling_locations: Tensor) -> MSDASizes:
    """The sizes of ``value [B, Nk, H, D]`` and ``sampling_locations [B, Nq, H, L, P, 2]``."""
    bs, num_keys, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    return MSDASizes(bs, num_keys, num_heads, head_dim, num_queries, num_levels, num_points)


def level_shapes(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    """``(h_l, w_l)`` of every level as Python ints (fixed constants in an exported graph)."""
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def level_maps(value: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """``value [B, Nk, H, D]`` split into one ``[B*H, D, h_l, w_l]`` map per level (copies)."""
    bs, _, num_heads, head_dim = value.shape
    parts = value.split([h * w for h, w in shapes], dim=1)
    # [B, h*w, H, D] -> [B, H*D, h*w] -> [B*H, D, h, w]
    return [part.flatten(2).transpose(1, 2).reshape(bs * num_heads, head_dim, h, w)
            for part, (h, w) in zip(parts, shapes)]
