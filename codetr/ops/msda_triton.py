"""Triton kernels for multi-scale deformable attention (forward and backward).

One program handles ``BLOCK_Q`` (batch, query) rows of one head with all ``D`` channels
of that head, so channel loads are contiguous ``D``-vectors of ``value [B, Nk, H, D]``.
Bilinear sampling reproduces ``F.grid_sample(mode='bilinear', padding_mode='zeros',
align_corners=False)``: the pixel coordinate is ``loc * size - 0.5`` and each of the
four neighbouring pixels contributes only when it lies inside the map.

Compute is fp32 whatever the input dtypes (fp32, fp16, bf16); the output has the dtype
of ``value`` and each gradient the dtype of its input. The gradient of ``value`` is
scattered with fp32 atomic adds because many queries sample the same pixel.

``TRITON_INTERPRET=1`` must be set before this module is imported to run the kernels
on CPU tensors (Triton reads it when ``@triton.jit`` decorates the kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from codetr.ops.msda_shapes import msda_sizes


@triton.jit
def _corner(value_ptr, value_row0, yy, xx, height, width, level_start, d, mask_qd,
            NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Loads the pixel ``(yy, xx)`` of one level for every row: ``[BLOCK_Q, BLOCK_D]``.

    Returns the values (zero outside the map), their element offsets and the load mask.
    """
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    key = level_start + yy * width + xx  # [BLOCK_Q] index into Nk
    row = value_row0 + key.to(tl.int64) * NUM_HEADS  # row of value viewed as [B*Nk*H, D]
    offs = row[:, None] * HEAD_DIM + d[None, :]
    mask = mask_qd & inside[:, None]
    vals = tl.load(value_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return vals, offs, mask


@triton.jit
def _pixel_coords(loc_ptr, lp, mask_q, height_f, width_f):
    """Pixel coordinates of one point per row, clamped so the int cast cannot overflow.

    Clamping to ``[-2, size + 1]`` keeps every clamped point fully outside the map, where
    all four corners are masked, so values and gradients are unchanged.
    """
    # Out-of-range rows get a point far outside the map: all corners masked.
    x = tl.load(loc_ptr + 2 * lp, mask=mask_q, other=-10.0).to(tl.float32)
    y = tl.load(loc_ptr + 2 * lp + 1, mask=mask_q, other=-10.0).to(tl.float32)
    x_im = tl.minimum(tl.maximum(x * width_f - 0.5, -2.0), width_f + 1.0)
    y_im = tl.minimum(tl.maximum(y * height_f - 0.5, -2.0), height_f + 1.0)
    x0f = tl.floor(x_im)
    y0f = tl.floor(y_im)
    return x_im - x0f, y_im - y0f, x0f.to(tl.int32), y0f.to(tl.int32)


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, start_ptr, loc_ptr, attw_ptr, out_ptr,
    num_rows, num_queries, num_keys,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # flat b * Nq + query
    mask_q = q < num_rows
    d = tl.arange(0, BLOCK_D)
    mask_qd = mask_q[:, None] & (d < HEAD_DIM)[None, :]
    batch = (q // num_queries).to(tl.int64)
    value_row0 = batch * num_keys * NUM_HEADS + head
    qh = q.to(tl.int64) * NUM_HEADS + head  # row of [B*Nq*H]
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(NUM_LEVELS):  # a runtime loop: unrolling L x P bloats compile time
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        level_start = tl.load(start_ptr + level).to(tl.int32)
        for point in tl.static_range(NUM_POINTS):
            lp = qh * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            lx, ly, x0, y0 = _pixel_coords(loc_ptr, lp, mask_q, height.to(tl.float32), width.to(tl.float32))
            a = tl.load(attw_ptr + lp, mask=mask_q, other=0.0).to(tl.float32)
            v00, _, _ = _corner(value_ptr, value_row0, y0, x0, height, width, level_start, d, mask_qd,
                                NUM_HEADS, HEAD_DIM)
            v01, _, _ = _corner(value_ptr, value_row0, y0, x0 + 1, height, width, level_start, d, mask_qd,
                                NUM_HEADS, HEAD_DIM)
            v10, _, _ = _corner(value_ptr, value_row0, y0 + 1, x0, height, width, level_start, d, mask_qd,
                                NUM_HEADS, HEAD_DIM)
            v11, _, _ = _corner(value_ptr, value_row0, y0 + 1, x0 + 1, height, width, level_start, d, mask_qd,
                                NUM_HEADS, HEAD_DIM)
            top = v00 * (1.0 - lx)[:, None] + v01 * lx[:, None]
            bottom = v10 * (1.0 - lx)[:, None] + v11 * lx[:, None]
            sampled = top * (1.0 - ly)[:, None] + bottom * ly[:, None]
            acc += a[:, None] * sampled
    out_offs = qh[:, None] * HEAD_DIM + d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_qd)


@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, start_ptr, loc_ptr, attw_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attw_ptr,
    num_rows, num_queries, num_keys,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = q < num_rows
    d = tl.arange(0, BLOCK_D)
    mask_qd = mask_q[:, None] & (d < HEAD_DIM)[None, :]
    batch = (q // num_queries).to(tl.int64)
    value_row0 = batch * num_keys * NUM_HEADS + head
    qh = q.to(tl.int64) * NUM_HEADS + head
    g = tl.load(grad_out_ptr + qh[:, None] * HEAD_DIM + d[None, :], mask=mask_qd, other=0.0).to(tl.float32)
    for level in range(NUM_LEVELS):  # a runtime loop: unrolling L x P bloats compile time
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        level_start = tl.load(start_ptr + level).to(tl.int32)
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        for point in tl.static_range(NUM_POINTS):
            lp = qh * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            lx, ly, x0, y0 = _pixel_coords(loc_ptr, lp, mask_q, height_f, width_f)
            hx = 1.0 - lx
            hy = 1.0 - ly
            a = tl.load(attw_ptr + lp, mask=mask_q, other=0.0).to(tl.float32)
            v00, o00, m00 = _corner(value_ptr, value_row0, y0, x0, height, width, level_start, d, mask_qd,
                                    NUM_HEADS, HEAD_DIM)
            v01, o01, m01 = _corner(value_ptr, value_row0, y0, x0 + 1, height, width, level_start, d, mask_qd,
                                    NUM_HEADS, HEAD_DIM)
            v10, o10, m10 = _corner(value_ptr, value_row0, y0 + 1, x0, height, width, level_start, d, mask_qd,
                                    NUM_HEADS, HEAD_DIM)
            v11, o11, m11 = _corner(value_ptr, value_row0, y0 + 1, x0 + 1, height, width, level_start, d,
                                    mask_qd, NUM_HEADS, HEAD_DIM)
            # Channel dot products of the upstream gradient with each corner: [BLOCK_Q].
            g00 = tl.sum(g * v00, axis=1)
            g01 = tl.sum(g * v01, axis=1)
            g10 = tl.sum(g * v10, axis=1)
            g11 = tl.sum(g * v11, axis=1)
            sampled_dot = hy * (hx * g00 + lx * g01) + ly * (hx * g10 + lx * g11)
            tl.store(grad_attw_ptr + lp, sampled_dot.to(grad_attw_ptr.dtype.element_ty), mask=mask_q)
            # d(pixel coordinate)/d(loc) is the map size (x_im = loc * size - 0.5).
            grad_x = a * (hy * (g01 - g00) + ly * (g11 - g10)) * width_f
            grad_y = a * (hx * (g10 - g00) + lx * (g11 - g01)) * height_f
            tl.store(grad_loc_ptr + 2 * lp, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=mask_q)
            tl.store(grad_loc_ptr + 2 * lp + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=mask_q)
            ag = a[:, None] * g
            tl.atomic_add(grad_value_ptr + o00, ag * (hy * hx)[:, None], mask=m00)
            tl.atomic_add(grad_value_ptr + o01, ag * (hy * lx)[:, None], mask=m01)
            tl.atomic_add(grad_value_ptr + o10, ag * (ly * hx)[:, None], mask=m10)
            tl.atomic_add(grad_value_ptr + o11, ag * (ly * lx)[:, None], mask=m11)


def _launch_config(num_rows: int, head_dim: int, num_heads: int) -> tuple[int, int, tuple[int, int]]:
    """Block sizes and grid: ``(BLOCK_Q, BLOCK_D, grid)``; about 2k fp32 per corner tile."""
    block_d = triton.next_power_of_2(head_dim)
    block_q = max(16, min(128, 2048 // block_d))
    return block_q, block_d, (triton.cdiv(num_rows, block_q), num_heads)


class MSDATritonFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; arguments as in ``multi_scale_deformable_attention``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        value = value.contiguous()
        spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
        level_start_index = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        bs, num_keys, num_heads, head_dim, num_queries, num_levels, num_points = msda_sizes(
            value, sampling_locations)
        out = value.new_empty(bs, num_queries, num_heads, head_dim)
        block_q, block_d, grid = _launch_config(bs * num_queries, head_dim, num_heads)
        _msda_fwd_kernel[grid](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
            bs * num_queries, num_queries, num_keys,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_LEVELS=num_levels, NUM_POINTS=num_points,
            BLOCK_Q=block_q, BLOCK_D=block_d,
        )
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return out.view(bs, num_queries, num_heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        bs, num_keys, num_heads, head_dim, num_queries, num_levels, num_points = msda_sizes(
            value, sampling_locations)
        grad_output = grad_output.contiguous()
        # fp32 accumulator: atomic adds of fp16/bf16 would round at every add.
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_loc = torch.empty_like(sampling_locations)
        grad_attw = torch.empty_like(attention_weights)
        block_q, block_d, grid = _launch_config(bs * num_queries, head_dim, num_heads)
        _msda_bwd_kernel[grid](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
            grad_value, grad_loc, grad_attw,
            bs * num_queries, num_queries, num_keys,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_LEVELS=num_levels, NUM_POINTS=num_points,
            BLOCK_Q=block_q, BLOCK_D=block_d,
        )
        return grad_value.to(value.dtype), None, None, grad_loc, grad_attw


def multi_scale_deformable_attention_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with Triton kernels (differentiable).

    Args:
        value: ``[B, Nk, H, D]`` values of all levels, each level flattened row-major.
        spatial_shapes: ``[L, 2]`` int64 ``(h_l, w_l)``.
        level_start_index: ``[L]`` int64 offset of each level in ``Nk``.
        sampling_locations: ``[B, Nq, H, L, P, 2]`` normalised ``(x, y)``, ``[0, 1]`` spans
            the map (``align_corners=False``); points outside read zeros.
        attention_weights: ``[B, Nq, H, L, P]``.

    Returns:
        ``[B, Nq, H * D]`` in ``value``'s dtype.
    """
    return MSDATritonFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
