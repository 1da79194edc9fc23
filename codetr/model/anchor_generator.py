"""Multi-scale, multi-ratio anchors of the Faster R-CNN co-head's RPN (mmdet's `AnchorGenerator`).

torchvision's `AnchorGenerator` does not fit: it rounds the base anchors to integers (mmdet keeps
[-11.3137, -5.6569, 11.3137, 5.6569] for stride 4, ratio 0.5, scale 4) and infers each level's
stride as `image_size // feature_size`, which is wrong for the ceil-divided extra levels
(a 160 px wide batch has a 2-wide stride-128 map). Both would move every anchor the official
RPN weights were trained with.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def base_anchors(stride: int, octave_base_scale: float, scales_per_octave: int,
                 ratios: Sequence[float]) -> Tensor:
    """The anchors of one level centred on (0, 0), as mmdet computes them (no rounding).

    Scales are `octave_base_scale * 2 ** (k / scales_per_octave)`, computed in float64 and cast to
    float32 as mmdet does; a ratio r is h / w (h = stride * scale * sqrt(r), w = stride * scale /
    sqrt(r)).

    Args:
        stride: the level's stride in pixels (mmdet's base size).
        octave_base_scale: anchor size in strides of the first scale.
        scales_per_octave: scales per octave.
        ratios: height / width ratios.

    Returns:
        `[R * S, 4]` float32 xyxy, ratio-major (row `r * S + s`, mmdet's `scale_major`).
    """
    octave = np.array([2 ** (k / scales_per_octave) for k in range(scales_per_octave)])
    scales = torch.tensor(octave * octave_base_scale, dtype=torch.float32)
    h_ratios = torch.sqrt(torch.tensor(list(ratios), dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


class AnchorGenerator:
    """Anchors of every level of a feature pyramid (no parameters; not an `nn.Module`).

    Location (y, x) of a level with stride s carries the level's base anchors shifted by
    (x * s, y * s): centred on the cell's top-left corner (mmdet's centre offset 0).

    Args:
        strides: per level stride in pixels.
        octave_base_scale: anchor size in strides of the first scale (Co-DINO's RPN: 4).
        scales_per_octave: scales per octave (3).
        ratios: height / width ratios (0.5, 1, 2).
    """

    def __init__(self, strides: Sequence[int], octave_base_scale: float = 4.0,
                 scales_per_octave: int = 3, ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> None:
        self.strides = list(strides)
        self.base = [base_anchors(s, octave_base_scale, scales_per_octave, ratios)
                     for s in self.strides]

    @property
    def num_anchors(self) -> int:
        """Anchors per location `A` (ratios x scales)."""
        return self.base[0].shape[0]

    def __call__(self, feat_sizes: Sequence[tuple[int, int]], device: torch.device | None = None
                 ) -> list[Tensor]:
        """Grid anchors.

        Args:
            feat_sizes: per level `(H_l, W_l)`, as many as `strides`.
            device: where to build them.

        Returns:
            per level `[H_l * W_l * A, 4]` float32 xyxy pixels, rows in (y, x, anchor) order:
            row `(y * W_l + x) * A + a` is anchor a of location (y, x) (the RPN's channel a).
        """
        if len(feat_sizes) != len(self.strides):
            raise ValueError(f"{len(feat_sizes)} feature sizes for {len(self.strides)} strides")
        anchors = []
        for (h, w), stride, base in zip(feat_sizes, self.strides, self.base):
            xs = torch.arange(w, device=device).to(torch.float32) * stride
            ys = torch.arange(h, device=device).to(torch.float32) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)  # [H*W, 4]
            anchors.append((base.to(device)[None] + shifts[:, None]).reshape(-1, 4))
        return anchors
