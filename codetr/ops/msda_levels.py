"""Multi-scale deformable attention, grid_sample per level in a level-major layout (CPU default).

The same math as the reference (``msda.py``), arranged for the CPU:

- the sampling grid and the attention weights are permuted ONCE into ``[L, B*H, P, Nq, 2]`` and
  ``[L, B*H, P, Nq]`` (contiguous), so every level's slice is a plain view; the reference slices
  ``[B, Nq, H, L, P, 2]`` per level, and a strided weight operand makes the broadcast multiply
  run element by element (10x slower than contiguous when B = 1);
- each level's samples ``[B*H, D, P, Nq]`` are weighted and summed over ``P`` right away, with
  ``Nq`` innermost (vectorised), and the ``L`` partial sums added: no ``[B*H, D, Nq, L*P]`` stack
  (a copy of every sample: ~140 MB per encoder layer at 640x640), no reduction over a trailing
  axis of ``P`` elements. Without autograd (inference) the weighting is one fused multiply-add
  per point into one ``[B*H, D, Nq]`` accumulator (``addcmul_``): no product tensor at all;
- levels are split with ``unbind``/``split``, whose backward writes each level's gradient into
  one buffer instead of zero-filling a full-size gradient per level.

Measured against the reference and the gather path in BENCHMARKS.md ("Multi-scale deformable
attention"); the dispatcher (``msda.py``) takes this path on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.ops.msda_shapes import level_maps, level_shapes, msda_sizes


def multi_scale_deformable_attention_levels(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same arguments and result as ``codetr.ops.msda.multi_scale_deformable_attention_pytorch``.

    Args:
        value: ``[B, Nk, H, D]`` values of all levels, each level flattened row-major.
        spatial_shapes: ``[L, 2]`` int64 ``(h_l, w_l)``.
        level_start_index: ``[L]``, unused (levels are split by ``spatial_shapes``).
        sampling_locations: ``[B, Nq, H, L, P, 2]`` normalised ``(x, y)``, ``[0, 1]`` spans
            the map (``align_corners=False``); points outside read zeros.
        attention_weights: ``[B, Nq, H, L, P]``.

    Returns:
        ``[B, Nq, H * D]``.
    """
    del level_start_index
    n = msda_sizes(value, sampling_locations)
    rows = n.batch * n.num_heads
    # grid_sample wants [-1, 1] with -1/+1 at the outer pixel edges (align_corners=False).
    # [B, Nq, H, L, P, 2] -> [L, B, H, P, Nq, 2]; [B, Nq, H, L, P] -> [L, B, H, P, Nq]
    grids = 2 * sampling_locations - 1
    if torch.onnx.is_in_onnx_export():
        grids = grids.permute(3, 0, 2, 4, 1, 5).contiguous()
    else:
        # Each (x, y) pair moved as one complex64 element: a permuted copy with a trailing
        # axis of 2 is several times slower on the CPU. (ONNX has no complex type.)
        grids = torch.view_as_real(torch.view_as_complex(grids).permute(3, 0, 2, 4, 1).contiguous())
    weights = attention_weights.permute(3, 0, 2, 4, 1).contiguous()
    output = None
    for value_l, grid_l, weight_l in zip(level_maps(value, level_shapes(spatial_shapes)),
                                         grids.unbind(0), weights.unbind(0)):
        sampled = F.grid_sample(value_l, grid_l.view(rows, n.num_points, n.num_queries, 2),
                                mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*H, D, P, Nq]
        weight_l = weight_l.view(rows, 1, n.num_points, n.num_queries)
        if sampled.requires_grad or weight_l.requires_grad:
            # With autograd: one broadcast product and a sum, whose backward is one product too
            # (the per-point form below would zero-fill a full-size gradient per point).
            part = (sampled * weight_l).sum(2)  # [B*H, D, Nq]
            output = part if output is None else output + part
            continue
        for point in range(n.num_points):
            # Inference: one fused multiply-add per point into the [B*H, D, Nq] accumulator, no
            # [B*H, D, P, Nq] product and no reduction pass.
            term = (sampled[:, :, point], weight_l[:, :, point])
            output = term[0] * term[1] if output is None else output.addcmul_(*term)
    # [B*H, D, Nq] -> [B, H*D, Nq] -> [B, Nq, H*D]
    return output.view(n.batch, n.num_heads * n.head_dim, n.num_queries).transpose(1, 2).contiguous()
