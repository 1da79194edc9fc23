"""Sampling and losses of the co-head's RoI head (mmdet's `StandardRoIHead` + `BBoxHead.loss`
under Co-DINO's config).

Per image the RPN's proposals are assigned by max IoU (0.5, no low-quality matches), the gt boxes
are prepended as proposals assigned to themselves, and 512 RoIs are sampled (a quarter positive
at most), positives first. Losses: softmax cross-entropy over C + 1 classes on every sampled RoI;
GIoU between the decoded box of the positive's gt class (`reg_decoded_bbox`, not clipped) and its
gt. BOTH are divided by the number of sampled RoIs of the batch (mmdet normalises the box term by
all samples, not by the positives). Terms come back UNWEIGHTED.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.boxes import elementwise_generalized_box_iou
from codetr.losses.atss_loss import DELTA_STDS, delta_xywh_decode
from codetr.losses.max_iou_assigner import max_iou_assign

Sampler = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class RoISamples:
    """One image's sampled RoIs, positives first (mmdet's `SamplingResult`).

    Attributes:
        boxes: `[S, 4]` xyxy pixels: the sampled gt boxes / proposals (not regressed).
        labels: `[S]` int64: the assigned gt's label, `num_classes` for negatives.
        gt_boxes: `[S, 4]` xyxy pixels: the assigned gt box, zeros for negatives.
        num_pos: number of positives (the first rows).
        assigned_gt_inds: `[G + P]` int64 over [gts; proposals]: 0 negative, k > 0 gt k - 1.
        pos_inds: `[num_pos]` indices into [gts; proposals] (ascending).
        neg_inds: `[S - num_pos]` indices into [gts; proposals] (ascending).
    """
    boxes: Tensor
    labels: Tensor
    gt_boxes: Tensor
    num_pos: int
    assigned_gt_inds: Tensor
    pos_inds: Tensor
    neg_inds: Tensor


def sample_rois(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int,
                sampler: Sampler) -> RoISamples:
    """Assigns one image's proposals, adds the gts as proposals and samples.

    Args:
        proposals: `[P, 4]` xyxy pixels (detached RPN proposals).
        gt_boxes: `[G, 4]` xyxy pixels.
        gt_labels: `[G]` int64 label indices.
        num_classes: `C`, also the background label.
        sampler: `assigned_gt_inds -> (pos_inds, neg_inds)` (e.g. `RandomSampler(512, 0.25)`).

    Returns:
        The image's `RoISamples`.
    """
    gt_boxes = gt_boxes.to(proposals)
    assigned, _ = max_iou_assign(proposals, gt_boxes, pos_iou_thr=0.5, neg_iou_thr=0.5,
                                 min_pos_iou=0.5, match_low_quality=False)
    # mmdet assigns the proposals first, then prepends the gts as positives of themselves.
    candidates = torch.cat([gt_boxes, proposals])
    gt_self = torch.arange(1, gt_boxes.shape[0] + 1, device=assigned.device)
    assigned = torch.cat([gt_self, assigned])
    pos, neg = sampler(assigned)
    keep = torch.cat([pos, neg])
    labels = torch.full((keep.shape[0],), num_classes, dtype=torch.long, device=keep.device)
    targets = candidates.new_zeros(keep.shape[0], 4)
    if pos.numel() > 0:
        matched = assigned[pos] - 1
        labels[:pos.numel()] = gt_labels.to(keep.device)[matched]
        targets[:pos.numel()] = gt_boxes[matched]
    return RoISamples(boxes=candidates[keep], labels=labels, gt_boxes=targets,
                      num_pos=int(pos.numel()), assigned_gt_inds=assigned, pos_inds=pos,
                      neg_inds=neg)


def roi_losses(cls_logits: Tensor, deltas: Tensor, rois: Tensor, labels: Tensor,
               gt_boxes: Tensor, num_classes: int) -> dict[str, Tensor]:
    """RoI head losses of a batch of sampled RoIs.

    Args:
        cls_logits: `[N, C + 1]` logits (index C: background).
        deltas: `[N, 4C]` class-specific DeltaXYWH deltas (stds `DELTA_STDS`).
        rois: `[N, 4]` xyxy pixels the deltas refer to.
        labels: `[N]` int64, C for background.
        gt_boxes: `[N, 4]` xyxy pixels (used for the positives).
        num_classes: `C`.

    Returns:
        `loss_cls` (cross-entropy) and `loss_bbox` (1 - GIoU), float32 scalars, unweighted.
    """
    count = max(labels.shape[0], 1)
    loss_cls = F.cross_entropy(cls_logits.float(), labels, reduction="sum") / count
    positive = labels < num_classes
    pos_deltas = deltas.float().reshape(deltas.shape[0], num_classes, 4)[positive, labels[positive]]
    pos_boxes = delta_xywh_decode(rois[positive].float(), pos_deltas, DELTA_STDS)
    giou = elementwise_generalized_box_iou(pos_boxes, gt_boxes[positive].float())
    loss_bbox = (1 - giou).sum() / count
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


def batch_rois(samples: Sequence[RoISamples]) -> Tensor:
    """`[N, 5]` (batch index, x1, y1, x2, y2) of every image's sampled RoIs (mmdet's `bbox2roi`)."""
    return torch.cat([torch.cat([s.boxes.new_full((s.boxes.shape[0], 1), float(b)), s.boxes], 1)
                      for b, s in enumerate(samples)])
