"""Multi-scale deformable attention, grid_sample per level in a level-major layout (CPU default).

The same math as the reference (``msda.py``), arranged for the CPU:

- the sampling grid and the attention weights are permuted ONCE into ``[L, B*H, P, Nq, 2]`` and
  ``[L, B*H, P, Nq]`` (contiguous), so every level's slice is a plain view; the reference slices
  ``[B, Nq, H, L, P, 2]`` per level, and a strided weight operand makes the broadcast multiply
  run element by element (10x slower than contiguous when B = 1);
- each level's samples ``[B*H, D, P, Nq]`` are weighted and summed over ``P`` right away and the
  ``L`` partial sums added: no ``[B*H, D, Nq, L*P]`` stack (a copy of every sample: ~140 MB per
  encoder layer at 640x640), and the reduction runs over a middle axis with ``Nq`` innermost
  (vectorised) instead of over a trailing axis of ``P`` elements;
- levels are split with ``unbind``/``split``, whose backward writes each level's gradient into
  one buffer instead of zero-filling a full-size gradient per level.

Measured against the reference and the gather path in BENCHMARKS.md ("Multi-scale deformable
attention"); the dispatcher (``msda.py``) takes this path on the CPU.
"""
from __future__ import annotations

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
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 4, 1, 5).contiguous()
    weights = attention_weights.permute(3, 0, 2, 4, 1).contiguous()
    output = None
    for value_l, grid_l, weight_l in zip(level_maps(value, level_shapes(spatial_shapes)),
                                         grids.unbind(0), weights.unbind(0)):
        sampled = F.grid_sample(value_l, grid_l.view(rows, n.num_points, n.num_queries, 2),
                                mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*H, D, P, Nq]
        part = (sampled * weight_l.view(rows, 1, n.num_points, n.num_queries)).sum(2)  # [B*H, D, Nq]
        output = part if output is None else output + part
    # [B*H, D, Nq] -> [B, H*D, Nq] -> [B, Nq, H*D]
    return output.view(n.batch, n.num_heads * n.head_dim, n.num_queries).transpose(1, 2).contiguous()
