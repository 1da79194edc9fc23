"""Losses of the co-head's RPN (mmdet's `RPNHead.loss_by_feat` under Co-DINO's config).

Every anchor is assigned by max IoU (0.7 / 0.3, low-quality matches from 0.3), 256 per image are
sampled (half positive at most); BCE on the objectness of the sampled anchors, L1 on the deltas
(stds 1) of the positives, both divided by the sampled count of the batch. Terms come back
UNWEIGHTED and per level (the caller owns the weights and sums the levels).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.losses.atss_assigner import valid_anchor_masks
from codetr.losses.atss_loss import delta_xywh_encode
from codetr.losses.max_iou_assigner import max_iou_assign

# The RPN's coder: DeltaXYWH with means 0, stds 1.
RPN_STDS = (1.0, 1.0, 1.0, 1.0)

Sampler = Callable[[Tensor], tuple[Tensor, Tensor]]


def rpn_assign(anchors_xyxy: Tensor, gt_boxes_xyxy: Tensor) -> Tensor:
    """Co-DINO's RPN assignment of one image: `[A]` -1 ignored, 0 negative, k > 0 gt k - 1."""
    return max_iou_assign(anchors_xyxy, gt_boxes_xyxy, pos_iou_thr=0.7, neg_iou_thr=0.3,
                          min_pos_iou=0.3, match_low_quality=True)[0]


def rpn_losses(cls_logits: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
               gt_boxes: Sequence[Tensor], sampler: Sampler,
               pad_sizes: Optional[Sequence[Optional[Sequence[int]]]] = None) -> dict[str, Tensor]:
    """RPN objectness and box losses of a batch.

    mmdet's `allowed_border=-1`: no inside-the-image check, so anchors over an image's own
    padding take part; anchors centred beyond its `pad_size` (over another image's padding) are
    invalid, as mmdet's valid flags make them: neither assigned nor sampled.

    Args:
        cls_logits: per level `[B, A_l]` objectness logits, rows in (y, x, anchor) order.
        deltas: per level `[B, A_l, 4]` deltas (stds 1).
        anchors: per level `[A_l, 4]` xyxy pixels, shared by the images.
        gt_boxes: B tensors `[N_i, 4]` xyxy pixels.
        sampler: `assigned_gt_inds [A] -> (pos_inds, neg_inds)` (e.g. `RandomSampler(256, 0.5)`),
            called image by image in batch order (on the image's valid anchors).
        pad_sizes: per image `(h, w)` padded extent (`codetr.data.collate.pad_size`), or None
            (every anchor valid).

    Returns:
        `loss_rpn_cls` and `loss_rpn_bbox`, each `[num_levels]` float32: the level's share of the
        batch loss (the sum over levels is the loss).
    """
    counts = [a.shape[0] for a in anchors]
    all_anchors = torch.cat(list(anchors)).float()  # [A, 4]
    logits = torch.cat(list(cls_logits), dim=1).float()  # [B, A]
    preds = torch.cat(list(deltas), dim=1).float()  # [B, A, 4]
    batch, num_anchors = logits.shape
    if all_anchors.shape[0] != num_anchors or len(gt_boxes) != batch:
        raise ValueError(f"{all_anchors.shape[0]} anchors / {len(gt_boxes)} images for "
                         f"logits of shape {tuple(logits.shape)}")
    labels = logits.new_zeros(batch, num_anchors)
    label_weights = logits.new_zeros(batch, num_anchors)
    box_targets = logits.new_zeros(batch, num_anchors, 4)
    box_weights = logits.new_zeros(batch, num_anchors)
    avg_factor = 0
    masks = valid_anchor_masks(all_anchors, list(pad_sizes) if pad_sizes is not None else [None] * batch)
    for b, (gts, valid) in enumerate(zip(gt_boxes, masks)):
        gts = gts.to(all_anchors)
        if valid is None:
            assigned = rpn_assign(all_anchors, gts)
            pos, neg = sampler(assigned)
        else:  # as mmdet: assign and sample the valid anchors only, indices mapped back
            rows = valid.nonzero()[:, 0]
            inside = rpn_assign(all_anchors[rows], gts)
            pos, neg = sampler(inside)
            pos, neg = rows[pos], rows[neg]
            assigned = inside.new_zeros(num_anchors)
            assigned[rows] = inside
        labels[b, pos] = 1.0
        label_weights[b, pos] = 1.0
        label_weights[b, neg] = 1.0
        if pos.numel() > 0:
            box_targets[b, pos] = delta_xywh_encode(all_anchors[pos], gts[assigned[pos] - 1],
                                                    RPN_STDS)
            box_weights[b, pos] = 1.0
        # mmdet's SamplingResult.avg_factor: max(#pos, 1) + max(#neg, 1) per image.
        avg_factor += max(pos.numel(), 1) + max(neg.numel(), 1)

    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * label_weights
    l1 = (preds - box_targets).abs().sum(dim=-1) * box_weights
    loss_cls = torch.stack([part.sum() for part in bce.split(counts, dim=1)]) / avg_factor
    loss_bbox = torch.stack([part.sum() for part in l1.split(counts, dim=1)]) / avg_factor
    return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}
