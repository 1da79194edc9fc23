"""Balanced random sampling of assigned anchors / proposals (mmdet's `RandomSampler`).

At most `int(num * pos_fraction)` positives, then negatives up to `num`, uniformly without
replacement, drawn as mmdet draws them: a CPU `torch.randperm` over the positives only when they
exceed their quota, then one over the negatives only when they exceed theirs, from the global
generator. So the same seed gives mmdet's sample (tests/test_rcnn_reference.py redraws the
reference's indices from its seeds). The indices come back ascending, as mmdet's `unique()` leaves
them.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _choose(gallery: Tensor, count: int) -> Tensor:
    """`count` of the `[G]` indices in `gallery` (all of them when G <= count), ascending."""
    if gallery.numel() > count:
        gallery = gallery[torch.randperm(gallery.numel())[:count].to(gallery.device)]
    return gallery.unique()


class RandomSampler:
    """Samples `num` indices per call: positives (assigned > 0) first up to the quota, then
    negatives (assigned == 0); ignored entries (-1) are never drawn.

    Args:
        num: indices per image (RPN 256, RoI head 512).
        pos_fraction: largest fraction of positives (RPN 0.5, RoI head 0.25).
    """

    def __init__(self, num: int, pos_fraction: float) -> None:
        self.num = num
        self.pos_fraction = pos_fraction

    def __call__(self, assigned_gt_inds: Tensor) -> tuple[Tensor, Tensor]:
        """One image's draw.

        Args:
            assigned_gt_inds: `[A]` int64: -1 ignored, 0 negative, k > 0 assigned to gt k - 1.

        Returns:
            `(pos_inds [P], neg_inds [M])` int64, each ascending, P + M <= num.
        """
        pos = _choose((assigned_gt_inds > 0).nonzero()[:, 0], int(self.num * self.pos_fraction))
        neg = _choose((assigned_gt_inds == 0).nonzero()[:, 0], self.num - pos.numel())
        return pos, neg
