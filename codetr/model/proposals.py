"""RPN proposals: top scores per level, decode, clip, per-level NMS (mmdet's `RPNHead` predict).

The NMS is torchvision's kernel (same IoU arithmetic as mmcv's, boxes suppressed at IoU > thr)
fed in mmcv's order. mmcv's CPU NMS ranks the boxes with torch's default (unstable) descending
sort; torchvision's uses a stable sort, which swaps equal-score boxes, and equal scores are common
with a freshly initialised RPN. Sorting first with the default sort and handing torchvision the
sorted boxes reproduces mmcv exactly: a stable sort of sorted scores keeps their order.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

from codetr.losses.atss_loss import delta_xywh_decode
from codetr.losses.rpn_loss import RPN_STDS


def mmcv_order_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS in mmcv's order.

    Args:
        boxes: `[N, 4]` xyxy.
        scores: `[N]`.
        iou_threshold: a box whose IoU with a kept box exceeds this is dropped.

    Returns:
        `[K]` int64 indices of the kept boxes, by descending score (ties as mmcv).
    """
    order = scores.sort(dim=0, descending=True).indices
    return order[nms(boxes[order], scores[order], iou_threshold)]


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group (level or class), as mmcv's `batched_nms`.

    Groups are separated by mmcv's coordinate-offset trick (boxes of group g shifted by
    g * (max coordinate + 1)), whose offset coordinates also fix the IoU rounding. mmcv switches
    to a per-group loop from 10,000 boxes on; Co-DINO's RPN never gets there (at most 7,852).

    Args:
        boxes: `[N, 4]` xyxy.
        scores: `[N]`.
        groups: `[N]` int64 group ids.
        iou_threshold: NMS IoU threshold.

    Returns:
        `[K]` int64 kept indices by descending score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return mmcv_order_nms(boxes + offsets[:, None], scores, iou_threshold)


def rpn_proposals(cls_logits: Sequence[Tensor], deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                  image_size: Sequence[int], nms_pre: int, iou_threshold: float, max_per_img: int,
                  min_bbox_size: float = 0.0) -> tuple[Tensor, Tensor]:
    """Proposals of ONE image from its RPN outputs.

    Per level: the `nms_pre` best anchors by sigmoid score (all when fewer); decode, clip to the
    image, drop boxes not wider and higher than `min_bbox_size`; NMS within each level; keep the
    best `max_per_img` across levels.

    Args:
        cls_logits: per level `[A_l]` objectness logits, rows in (y, x, anchor) order.
        deltas: per level `[A_l, 4]` DeltaXYWH deltas (stds 1).
        anchors: per level `[A_l, 4]` xyxy pixels.
        image_size: `(h, w)` of the unpadded image: proposals are clipped to it.
        nms_pre: anchors kept per level before NMS (Co-DINO: 1000 test, 4000 train).
        iou_threshold: NMS IoU threshold (0.7).
        max_per_img: proposals kept after NMS (1000).
        min_bbox_size: minimum proposal side in pixels (0).

    Returns:
        `(boxes [K, 4] xyxy pixels, scores [K])`, by descending score, K <= max_per_img.
    """
    level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
    for level, (logits, delta, anchor) in enumerate(zip(cls_logits, deltas, anchors)):
        scores = logits.sigmoid()
        if 0 < nms_pre < scores.shape[0]:
            scores, rank = scores.sort(descending=True)
            scores, rank = scores[:nms_pre], rank[:nms_pre]
            delta, anchor = delta[rank], anchor[rank]
        level_scores.append(scores)
        level_deltas.append(delta)
        level_anchors.append(anchor)
        level_ids.append(torch.full_like(scores, level, dtype=torch.long))
    scores = torch.cat(level_scores)
    levels = torch.cat(level_ids)
    boxes = delta_xywh_decode(torch.cat(level_anchors), torch.cat(level_deltas), RPN_STDS)
    h, w = (float(v) for v in image_size)
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=-1)
    wh = boxes[:, 2:] - boxes[:, :2]
    valid = (wh > min_bbox_size).all(dim=1)
    if not bool(valid.all()):
        boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
    keep = batched_nms(boxes, scores, levels, iou_threshold)[:max_per_img]
    return boxes[keep], scores[keep]
