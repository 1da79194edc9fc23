"""ATSS label assignment (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and
Anchor-free Detection"), as mmdet's `ATSSAssigner` computes it for the Co-DETR ATSS head.

For every gt box: on every pyramid level take the `topk` anchors whose centres are nearest to
the gt centre; their IoUs with the gt give an adaptive threshold `mean + std`; a candidate is
positive when its IoU reaches the threshold AND its centre lies inside the gt. An anchor claimed
by several gts goes to the one it overlaps most.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from codetr.boxes import box_iou

# mmdet's ATSSAssigner: an anchor centre counts as inside a gt only when it is at least this
# far (in pixels) from every side, which also rejects centres exactly on the border.
_INSIDE_EPS = 0.01


def anchors_inside_image(anchors_xyxy: Tensor, valid_hw: Sequence[int]) -> Tensor:
    """Which anchors have their centre in the unpadded part of the image.

    With anchors centred on `(x * stride, y * stride)` this is exactly mmdet's per-level valid
    flags (`x < ceil(w / stride)`): anchors over zero padding see no image and are ignored.

    Args:
        anchors_xyxy: `[A, 4]` xyxy pixels.
        valid_hw: `(h, w)` of the image before padding, pixels.

    Returns:
        `[A]` bool.
    """
    cx = (anchors_xyxy[:, 0] + anchors_xyxy[:, 2]) / 2
    cy = (anchors_xyxy[:, 1] + anchors_xyxy[:, 3]) / 2
    return (cx < float(valid_hw[1])) & (cy < float(valid_hw[0]))


def valid_anchor_masks(anchors_xyxy: Tensor,
                       pad_sizes: Sequence[Optional[Sequence[int]]]) -> list[Optional[Tensor]]:
    """Per image, mmdet's valid flags (`anchors_inside_image` of its `pad_size`, `[A]` bool), or
    None when every anchor is valid (no pad_size, or one beyond every anchor centre): the
    unmasked path. One host sync per batch (the largest centre), none without any pad_size."""
    if all(p is None for p in pad_sizes):
        return [None] * len(pad_sizes)
    centres = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
    max_x, max_y = centres.amax(dim=0).tolist()
    covered = [p is None or (max_y < p[0] and max_x < p[1]) for p in pad_sizes]
    return [None if c else anchors_inside_image(anchors_xyxy, p) for p, c in zip(pad_sizes, covered)]


def atss_assign(anchors_xyxy: Tensor, num_anchors_per_level: Sequence[int],
                gt_boxes_xyxy: Tensor, gt_labels: Tensor, topk: int = 9,
                valid_hw: Optional[Sequence[int]] = None) -> tuple[Tensor, Tensor]:
    """Assigns each anchor of one image to a gt box or to the background.

    Args:
        anchors_xyxy: `[A, 4]` xyxy pixels, levels concatenated in pyramid order.
        num_anchors_per_level: anchors of each level, summing to `A`.
        gt_boxes_xyxy: `[G, 4]` xyxy pixels (non-degenerate).
        gt_labels: `[G]` int64 label indices.
        topk: candidates per level and gt (fewer when a level has fewer valid anchors).
        valid_hw: `(h, w)` of the unpadded image; anchors centred in the padding are never
            candidates (they are removed before the top-k, as mmdet does). `None`: all valid.

    Returns:
        `(assigned_gt_index [A] int64, assigned_labels [A] int64)`: the index into the gts,
        `-1` for background; the label of that gt, `-1` for background.
    """
    num_anchors = anchors_xyxy.shape[0]
    num_gts = gt_boxes_xyxy.shape[0]
    if sum(num_anchors_per_level) != num_anchors:
        raise ValueError(f"num_anchors_per_level sums to {sum(num_anchors_per_level)}, "
                         f"expected {num_anchors}")
    device = anchors_xyxy.device
    assigned = torch.full((num_anchors,), -1, dtype=torch.long, device=device)
    if num_gts == 0 or num_anchors == 0:
        return assigned, assigned.clone()

    anchors = anchors_xyxy.detach()
    if not anchors.is_floating_point():
        anchors = anchors.float()
    gts = gt_boxes_xyxy.detach().to(device=device, dtype=anchors.dtype)
    valid = (anchors_inside_image(anchors, valid_hw) if valid_hw is not None
             else torch.ones(num_anchors, dtype=torch.bool, device=device))

    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
    gt_centres = (gts[:, :2] + gts[:, 2:]) / 2  # [G, 2]
    # Direct differences, not the matmul shortcut: its rounding would reorder near-ties.
    distances = torch.cdist(anchor_centres, gt_centres,
                            compute_mode="donot_use_mm_for_euclid_dist")  # [A, G]
    # Invalid anchors sort last, so the top-k of a level only reaches them when the level has
    # fewer than k valid anchors, which `k` below excludes.
    distances = distances.masked_fill(~valid[:, None], float("inf"))

    # The valid counts bound k per level: one host sync for all levels, none at all when every
    # anchor is valid (`atss_losses` passes no valid_hw when an image's pad_size covers them all).
    if valid_hw is None:
        valid_counts = list(num_anchors_per_level)
    else:
        valid_counts = torch.stack([v.sum() for v in valid.split(list(num_anchors_per_level))]).tolist()
    candidates = []
    start = 0
    for level_count, level_valid_count in zip(num_anchors_per_level, valid_counts):
        k = min(topk, level_valid_count)
        if k > 0:
            level_dist = distances[start:start + level_count]
            candidates.append(level_dist.topk(k, dim=0, largest=False).indices + start)
        start += level_count
    if not candidates:
        return assigned, assigned.clone()
    candidate_idx = torch.cat(candidates, dim=0)  # [K, G] anchor indices, distinct per column

    ious = box_iou(anchors, gts)[0]  # [A, G]
    candidate_ious = ious.gather(0, candidate_idx)  # [K, G]
    mean = candidate_ious.mean(dim=0)
    # Unbiased std as in mmdet; a single candidate has no spread.
    std = (candidate_ious.std(dim=0) if candidate_ious.shape[0] > 1
           else torch.zeros_like(mean))
    is_pos = candidate_ious >= (mean + std)[None, :]

    centres = anchor_centres[candidate_idx]  # [K, G, 2]
    dist_to_sides = torch.stack((centres[..., 0] - gts[None, :, 0],
                                 centres[..., 1] - gts[None, :, 1],
                                 gts[None, :, 2] - centres[..., 0],
                                 gts[None, :, 3] - centres[..., 1]), dim=-1)  # [K, G, 4]
    is_pos &= dist_to_sides.amin(dim=-1) > _INSIDE_EPS

    # IoU of the positive (anchor, gt) pairs, -inf elsewhere; the row-wise max resolves anchors
    # claimed by several gts in favour of the highest IoU.
    pos_ious = torch.full_like(ious, float("-inf"))
    pos_ious.scatter_(0, candidate_idx, candidate_ious.masked_fill(~is_pos, float("-inf")))
    best_iou, best_gt = pos_ious.max(dim=1)  # [A]
    positive = best_iou > float("-inf")
    # torch.where instead of boolean-mask writes: the same values without a nonzero() sync.
    assigned = torch.where(positive, best_gt, assigned)
    labels = torch.where(positive, gt_labels.to(device=device, dtype=torch.long)[best_gt], -1)
    return assigned, labels
