"""Balanced random sampling of assigned anchors / proposals (mmdet's `RandomSampler`).

A thin wrapper of torchvision's `BalancedPositiveNegativeSampler` (same quotas as mmdet: at most
`num * pos_fraction` positives, the rest negatives, uniformly without replacement) that returns
sorted index tensors, the order mmdet's sampling results have. The random stream differs from
mmdet's (torchvision also permutes the positives when they are under quota), so a reference
comparison injects the reference's draws instead (any callable with this signature).
"""
from __future__ import annotations

from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler


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
        self._sampler = BalancedPositiveNegativeSampler(num, pos_fraction)

    def __call__(self, assigned_gt_inds: Tensor) -> tuple[Tensor, Tensor]:
        """One image's draw.

        Args:
            assigned_gt_inds: `[A]` int64: -1 ignored, 0 negative, k > 0 assigned to gt k - 1.

        Returns:
            `(pos_inds [P], neg_inds [M])` int64, each ascending, P + M <= num.
        """
        pos_mask, neg_mask = self._sampler([assigned_gt_inds])
        return pos_mask[0].nonzero()[:, 0], neg_mask[0].nonzero()[:, 0]
