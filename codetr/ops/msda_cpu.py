"""Gather-based multi-scale deformable attention, the fast path on CPU.

Bilinear sampling plus the attention-weighted sum is a sparse weighted sum of value rows:
every (batch, query, head) reads ``L * P * 4`` rows (4 bilinear corners per point) of
``value`` viewed as ``[B * Nk * H, D]``, with weight ``attention * bilinear``. Forward is
one ``F.embedding_bag(mode='sum', per_sample_weights=...)`` call, which reads ``value``
in place instead of the reference's transposed copies, per-level ``grid_sample`` and
``[B*H, D, Nq, L*P]`` stack. Backward of that sum is a chunked gather/scatter
(:class:`WeightedRowSum`); autograd carries the rest (corner weights -> locations and
attention weights) through plain element-wise ops.

Same bilinear zero-padding semantics as ``F.grid_sample(align_corners=False)``: pixel
coordinate ``loc * size - 0.5``, corners outside the map get weight 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from codetr.ops.msda_shapes import msda_sizes

# Elements of one [chunk, K, D] temporary in the backward pass (8 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 21


class WeightedRowSum(torch.autograd.Function):
    """``out[n] = sum_k weights[n, k] * table[index[n, k]]``, differentiable in table and weights."""

    @staticmethod
    def forward(ctx: FunctionCtx, table: Tensor, index: Tensor, weights: Tensor) -> Tensor:  # type: ignore[override]
        """Args: table ``[R, D]``, index ``[N, K]`` int32/int64 rows of table, weights ``[N, K]``.

        Returns ``[N, D]``.
        """
        ctx.save_for_backward(table, index, weights)
        return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None]:
        table, index, weights = ctx.saved_tensors
        num_bags, bag_size = index.shape
        dim = table.shape[1]
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[0] else None
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[2] else None
        # Chunks bound the [chunk, K, D] temporaries; a full-size one is ~GBs at 1024^2.
        step = max(1, _CHUNK_ELEMENTS // (bag_size * dim))
        for start in range(0, num_bags, step):
            idx = index[start:start + step].reshape(-1).long()  # index_add_ is ~10x slower with int32
            g = grad_out[start:start + step]  # [n, D]
            if grad_weights is not None:
                rows = table.index_select(0, idx).view(-1, bag_size, dim)  # [n, K, D]
                grad_weights[start:start + step] = torch.bmm(rows, g.unsqueeze(-1)).squeeze(-1)
            if grad_table is not None:
                contrib = weights[start:start + step].unsqueeze(-1) * g.unsqueeze(1)  # [n, K, D]
                grad_table.index_add_(0, idx, contrib.view(-1, dim))
        return grad_table, None, grad_weights


def _axis_corners(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """The two neighbouring pixels along one axis and their linear weights.

    Args:
        coord: ``[B, Nq, H, L, P]`` pixel coordinate (``loc * size - 0.5``).
        size: ``[L, 1]`` int64 map size along this axis.

    Returns:
        ``index [B, Nq, H, 2, L, P]`` int64 clamped into the map (a valid row to read)
        and ``weight [B, Nq, H, 2, L, P]``, 0 for a pixel outside the map. The pair sits
        before ``(L, P)`` so that element-wise ops run over long contiguous inner loops
        (a trailing size-2 dim makes broadcasting ops ~10x slower on CPU).
    """
    # Clamping before floor keeps far-away points outside the map without overflowing
    # the integer cast; floor carries no gradient.
    low = torch.minimum(coord.detach().clamp(min=-2.0), (size + 1).to(coord.dtype)).floor()
    frac = coord - low
    low = low.long()
    index = torch.stack([low, low + 1], dim=-3)
    inside = (index >= 0) & (index < size)
    weight = torch.stack([1 - frac, frac], dim=-3) * inside
    return torch.minimum(index.clamp(min=0), size - 1), weight


def _corner_rows_and_weights(
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    num_keys: int,
) -> tuple[Tensor, Tensor]:
    """Rows of ``value`` viewed as ``[B * Nk * H, D]`` and weights of the 4 corners of every point.

    Args:
        spatial_shapes: ``[L, 2]`` int64 ``(h, w)``.
        level_start_index: ``[L]`` int64.
        sampling_locations: ``[B, Nq, H, L, P, 2]`` normalised ``(x, y)``.
        attention_weights: ``[B, Nq, H, L, P]``.
        num_keys: ``Nk``.

    Returns:
        ``rows [B, Nq, H, 4, L, P]`` (int32 when the table is small enough) and
        ``weights [B, Nq, H, 4, L, P]`` = attention x bilinear, 0 for corners outside the
        map; corners ordered (y0, x0), (y0, x1), (y1, x0), (y1, x1). Weights carry autograd
        to the locations and attention weights.
    """
    bs, _, num_heads, num_levels, _, _ = sampling_locations.shape
    heights = spatial_shapes[:, 0].view(num_levels, 1)  # [L, 1] broadcasts over P
    widths = spatial_shapes[:, 1].view(num_levels, 1)
    xs, wx = _axis_corners(sampling_locations[..., 0] * widths.to(sampling_locations.dtype) - 0.5, widths)
    ys, wy = _axis_corners(sampling_locations[..., 1] * heights.to(sampling_locations.dtype) - 0.5, heights)
    # A corner is inside iff both of its axes are, so the outer product of the per-axis
    # weights is the masked bilinear weight; attention is folded in on the small factor.
    wy = wy * attention_weights.unsqueeze(-3).to(wy.dtype)
    weights = (wy.unsqueeze(-3) * wx.unsqueeze(-4)).flatten(-4, -3)
    index_dtype = torch.int32 if bs * num_keys * num_heads < 2**31 else torch.int64
    device = sampling_locations.device
    batch = torch.arange(bs, device=device).view(bs, 1, 1, 1, 1, 1)
    head = torch.arange(num_heads, device=device).view(1, 1, num_heads, 1, 1, 1)
    # row = (b * Nk + start_l + y * w_l + x) * H + head, split into a y part and an x part.
    row_y = (batch * num_keys + level_start_index.view(num_levels, 1) + ys * widths) * num_heads + head
    row_x = xs * num_heads
    rows = (row_y.to(index_dtype).unsqueeze(-3) + row_x.to(index_dtype).unsqueeze(-4)).flatten(-4, -3)
    return rows, weights


def multi_scale_deformable_attention_cpu(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention as a sparse weighted row sum (fast on CPU).

    Args:
        value: ``[B, Nk, H, D]`` values of all levels, each level flattened row-major.
        spatial_shapes: ``[L, 2]`` int64 ``(h_l, w_l)``.
        level_start_index: ``[L]`` int64 offset of each level in ``Nk``.
        sampling_locations: ``[B, Nq, H, L, P, 2]`` normalised ``(x, y)``, ``[0, 1]`` spans
            the map (``align_corners=False``); points outside read zeros.
        attention_weights: ``[B, Nq, H, L, P]``.

    Returns:
        ``[B, Nq, H * D]``.
    """
    bs, num_keys, num_heads, head_dim, num_queries, num_levels, num_points = msda_sizes(value, sampling_locations)
    spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64)
    level_start_index = level_start_index.to(device=value.device, dtype=torch.int64)
    rows, weights = _corner_rows_and_weights(
        spatial_shapes, level_start_index, sampling_locations, attention_weights, num_keys
    )
    bag = num_levels * num_points * 4
    out = WeightedRowSum.apply(
        value.reshape(bs * num_keys * num_heads, head_dim),
        rows.reshape(bs * num_queries * num_heads, bag),
        weights.reshape(bs * num_queries * num_heads, bag).to(value.dtype),
    )
    return out.view(bs, num_queries, num_heads * head_dim)
