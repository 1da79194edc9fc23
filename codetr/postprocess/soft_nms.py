"""Soft-NMS (Bodla et al. 2017): decay the scores of overlapping boxes instead of removing them.

Co-DINO's test config applies it per class after the top-k selection (linear, IoU 0.8); mmcv's
`soft_nms` is the reference for the semantics:

- linear: a box overlapping the picked one with IoU > iou_threshold is weighted by `1 - IoU`;
- gaussian: every box is weighted by `exp(-IoU^2 / sigma)`;
- boxes whose score falls to `score_threshold` or below are dropped.
"""
from __future__ import annotations

import torch
from torch import Tensor

from codetr.boxes import box_iou

METHODS = ("linear", "gaussian")


def soft_nms(boxes: Tensor, scores: Tensor, method: str, iou_threshold: float, sigma: float,
             score_threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """Class-agnostic soft-NMS.

    Args:
        boxes: `[N, 4]` xyxy (any unit).
        scores: `[N]` scores.
        method: "linear" or "gaussian".
        iou_threshold: linear only: overlaps at or below it are not decayed.
        sigma: gaussian only: width of the decay.
        score_threshold: boxes whose (decayed) score is <= this are dropped.

    Returns:
        `(keep [K] int64 indices into boxes, new_scores [K])`, sorted by new score descending.
    """
    iou = _pairwise_iou(boxes)
    return _soft_nms_from_iou(iou, scores, method, iou_threshold, sigma, score_threshold)


def batched_soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, method: str,
                     iou_threshold: float, sigma: float,
                     score_threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """Soft-NMS applied independently per label (boxes of different labels never interact).

    Args:
        boxes: `[N, 4]` xyxy.
        scores: `[N]`.
        labels: `[N]` int64 class of each box.
        method, iou_threshold, sigma, score_threshold: as in `soft_nms`.

    Returns:
        `(keep [K] int64 indices into boxes, new_scores [K])`, sorted by new score descending
        across all classes.
    """
    # Zeroing cross-class IoUs is exact, unlike torchvision's coordinate-offset trick whose
    # float32 offsets (label x image size) round the coordinates of high class ids.
    iou = _pairwise_iou(boxes)
    iou = iou * (labels[:, None] == labels[None, :])
    return _soft_nms_from_iou(iou, scores, method, iou_threshold, sigma, score_threshold)


def _pairwise_iou(boxes: Tensor) -> Tensor:
    """`[N, N]` IoU of `[N, 4]` xyxy boxes, at least float32 (half precision IoUs are coarse)."""
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    return box_iou(boxes, boxes)[0]


def _soft_nms_from_iou(iou: Tensor, scores: Tensor, method: str, iou_threshold: float,
                       sigma: float, score_threshold: float) -> tuple[Tensor, Tensor]:
    """Sequential soft-NMS on a precomputed `[N, N]` IoU matrix.

    Each step picks the highest live score, records it, and multiplies every score by that box's
    decay row. The loop never reads a value back to the host (except for an early exit on CPU),
    so on GPU it costs N small kernel launches and no synchronisation.
    """
    if method == "linear":
        decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
    elif method == "gaussian":
        decay = torch.exp(-(iou * iou) / sigma)
    else:
        raise ValueError(f"soft-NMS method {method!r} is not one of {METHODS}")
    n = scores.shape[0]
    current = scores.to(iou.dtype).clone()
    alive = current > score_threshold
    order = torch.zeros(n, dtype=torch.int64, device=scores.device)
    picked_scores = torch.zeros(n, dtype=current.dtype, device=scores.device)
    valid = torch.zeros(n, dtype=torch.bool, device=scores.device)
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    for step in range(n):
        if current.device.type == "cpu" and not bool(alive.any()):
            break  # nothing left: cheap to test on CPU, a host sync on GPU
        pick = torch.where(alive, current, neg_inf).argmax().view(1)  # [1]
        order[step] = pick[0]
        picked_scores[step] = current.index_select(0, pick)[0]
        valid[step] = alive.index_select(0, pick)[0]
        alive = alive.index_fill(0, pick, False)
        current = current * decay.index_select(0, pick)[0]
        alive = alive & (current > score_threshold)
    return order[valid], picked_scores[valid].to(scores.dtype)
