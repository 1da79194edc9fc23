"""One training pass of the Faster R-CNN co-head: RPN -> proposals -> RoI head -> positives.

Co-DINO's order: the RPN runs on all L + 1 co-head maps (strides up to 2x the last memory
level), the RoI head pools from the L memory maps only, and the RoI head's positive RoIs become
positive-query head 0 (before the ATSS heads). Loss weights relative to `co_head_loss_weight`
follow the official config (x12 there): RPN BCE 1, RPN L1 1, RoI cross-entropy 1, RoI GIoU 10.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from codetr.boxes import box_cxcywh_to_xyxy
from codetr.losses.atss_loss import PositiveSamples
from codetr.model.roi_head import CoStandardRoIHead
from codetr.model.rpn_head import RPNHead

RCNN_TERM_WEIGHTS = {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 1.0, "loss_roi_cls": 1.0,
                     "loss_roi_bbox": 10.0}


def pixel_targets(targets: Sequence[dict], device: torch.device
                  ) -> tuple[list[Tensor], list[Tensor], list[list[float]]]:
    """`(gt_boxes [N_i, 4] xyxy pixels, gt_labels [N_i], image_sizes (h, w))` per image from the
    DESIGN.md targets (cxcywh normalised by `size`)."""
    boxes, labels, sizes = [], [], []
    for t in targets:
        h, w = (float(v) for v in t["size"])
        scale = torch.tensor([w, h, w, h], device=device)
        boxes.append(box_cxcywh_to_xyxy(t["boxes"].to(device).float()) * scale)
        labels.append(t["labels"].to(device))
        sizes.append([h, w])
    return boxes, labels, sizes


def faster_rcnn_losses(rpn_head: RPNHead, roi_head: CoStandardRoIHead, maps: Sequence[Tensor],
                       targets: Sequence[dict], with_feats: bool = False
                       ) -> tuple[dict[str, Tensor], list[PositiveSamples]]:
    """The co-head's unweighted losses and its positives (training only).

    Args:
        rpn_head: the RPN (strides of all `maps`).
        roi_head: the RoI head (strides of `maps[:-1]`).
        maps: the L + 1 co-head maps `[B, D, H_l, W_l]` (`QueryHead.aux_feature_maps`).
        targets: B dicts (DESIGN.md data contract).
        with_feats: the positives carry their RoIs' mean pooled features (`with_coord_feat`).

    Returns:
        `(losses, positives)`: scalar `loss_rpn_cls`, `loss_rpn_bbox` (summed over levels),
        `loss_roi_cls`, `loss_roi_bbox`, unweighted; one `PositiveSamples` (pixels) per image.
    """
    gt_boxes, gt_labels, sizes = pixel_targets(targets, maps[0].device)
    pad_sizes = [t.get("pad_size") for t in targets]
    rpn, proposals = rpn_head.loss_and_proposals(maps, gt_boxes, sizes, pad_sizes)
    roi, positives, _ = roi_head.loss_and_positives(maps[:-1], proposals, gt_boxes, gt_labels,
                                                    with_feats)
    losses = {"loss_rpn_cls": rpn["loss_rpn_cls"].sum(), "loss_rpn_bbox": rpn["loss_rpn_bbox"].sum(),
              "loss_roi_cls": roi["loss_cls"], "loss_roi_bbox": roi["loss_bbox"]}
    return losses, positives
