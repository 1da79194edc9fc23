"""RoI feature extraction of the Faster R-CNN co-head (mmdet's `SingleRoIExtractor`).

Each RoI is pooled from ONE level, chosen by its scale as mmdet does:
`floor(log2(sqrt(area) / finest_scale + 1e-6))`, clamped to the levels (finest_scale 56: below
112 px level 0, [112, 224) level 1, ...). torchvision's `MultiScaleRoIAlign` does not fit: its
`LevelMapper` adds the eps after the log (a 112 px RoI lands on another level), infers the levels
from the feature sizes, and pools without `aligned=True`. The pooling itself is
`torchvision.ops.roi_align` with mmcv's settings (adaptive sampling, half-pixel `aligned`), with a
faster CPU backward (`codetr.ops.roi_align`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from codetr.ops.roi_align import roi_align


def roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """Pyramid level of each RoI.

    Args:
        rois: `[K, 5]` (batch index, x1, y1, x2, y2) pixels.
        num_levels: number of levels to choose from.
        finest_scale: scale (sqrt of the area, pixels) mapped to the start of level 0's range.

    Returns:
        `[K]` int64 in [0, num_levels).
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


class RoIExtractor:
    """RoIAlign on the level of each RoI (no parameters; not an `nn.Module`).

    Args:
        strides: stride in pixels of each input map (Co-DINO: the L memory levels, 4 .. 64; the
            extra stride-128 map never feeds the RoI head).
        output_size: pooled side (7).
        finest_scale: see `roi_levels` (56).
    """

    def __init__(self, strides: Sequence[int], output_size: int = 7, finest_scale: float = 56.0) -> None:
        self.strides = list(strides)
        self.output_size = output_size
        self.finest_scale = finest_scale

    def __call__(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        """Pools every RoI.

        Args:
            feats: maps `[B, D, H_l, W_l]`, one per stride.
            rois: `[K, 5]` (batch index, x1, y1, x2, y2) pixels of the padded batch.

        Returns:
            `[K, D, output_size, output_size]` in the maps' dtype.
        """
        if len(feats) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} maps, got {len(feats)}")
        size = self.output_size
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], size, size)
        levels = roi_levels(rois, len(feats), self.finest_scale)
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            index = (levels == level).nonzero()[:, 0]
            if index.numel() == 0:
                continue
            pooled = roi_align(feat, rois[index].to(feat.dtype), size, 1.0 / stride)
            out = out.index_copy(0, index, pooled.to(out.dtype))
        return out
