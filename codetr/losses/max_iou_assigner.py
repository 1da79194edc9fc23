"""Max-IoU label assignment of the Faster R-CNN co-head (mmdet's `MaxIoUAssigner`).

torchvision's `Matcher` has the same thresholds but a different low-quality rule: it gives an
anchor that is some gt's best match the anchor's OWN best gt, with no minimum IoU; mmdet gives it
THAT gt (the later gt wins), and only when the gt's best IoU reaches `min_pos_iou`. The RPN
reference depends on it, hence this version.
"""
from __future__ import annotations

import torch
from torch import Tensor

from codetr.boxes import box_iou


def max_iou_assign(boxes_xyxy: Tensor, gt_boxes_xyxy: Tensor, pos_iou_thr: float,
                   neg_iou_thr: float, min_pos_iou: float, match_low_quality: bool
                   ) -> tuple[Tensor, Tensor]:
    """Assigns each box (anchor or proposal) of one image to a gt, the background or nothing.

    1. every box starts ignored (-1);
    2. a box whose best IoU is in [0, neg_iou_thr) is negative (0);
    3. a box whose best IoU is >= pos_iou_thr takes that gt (first on ties);
    4. with `match_low_quality`, for each gt in order whose best IoU is >= min_pos_iou, every
       box with exactly that IoU takes this gt (mmdet's `gt_max_assign_all`).

    Args:
        boxes_xyxy: `[A, 4]` xyxy pixels.
        gt_boxes_xyxy: `[G, 4]` xyxy pixels.
        pos_iou_thr: IoU from which a box is positive (RPN 0.7, RoI head 0.5).
        neg_iou_thr: IoU below which a box is negative (RPN 0.3, RoI head 0.5).
        min_pos_iou: least IoU of a low-quality match (RPN 0.3).
        match_low_quality: give each gt its best boxes even below `pos_iou_thr` (RPN only).

    Returns:
        `(assigned_gt_inds [A] int64, max_overlaps [A])`: -1 ignored, 0 negative, k > 0 gt
        k - 1; the best IoU of each box (0 without gts).
    """
    num_boxes = boxes_xyxy.shape[0]
    device = boxes_xyxy.device
    if gt_boxes_xyxy.shape[0] == 0 or num_boxes == 0:
        # Without gts every box is a negative (mmdet).
        return (torch.zeros(num_boxes, dtype=torch.long, device=device),
                boxes_xyxy.new_zeros(num_boxes))
    overlaps = box_iou(gt_boxes_xyxy, boxes_xyxy)[0]  # [G, A]
    assigned = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
    max_overlaps, argmax = overlaps.max(dim=0)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg_iou_thr)] = 0
    positive = max_overlaps >= pos_iou_thr
    assigned[positive] = argmax[positive] + 1
    if match_low_quality:
        gt_max = overlaps.max(dim=1).values  # [G]
        for g in range(overlaps.shape[0]):
            # Each gt in order, so a later gt overwrites an earlier one on shared boxes.
            hit = (overlaps[g] == gt_max[g]) & (gt_max[g] >= min_pos_iou)
            assigned[hit] = g + 1
    return assigned, max_overlaps
