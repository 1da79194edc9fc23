"""Focal losses of the class logits.

- `sigmoid_focal_loss` (Lin et al. 2017): DINO's and TAO's query head, and the ATSS co-heads.
- `quality_focal_loss` (Li et al. 2020, Generalized Focal Loss): Co-DINO's query head. The target
  of a positive (query, class) pair is the IoU of the predicted box with its gt box, so the score
  ranks detections by localisation quality as COCO AP does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets_onehot: Tensor, alpha: float,
                       gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss; the caller sums and normalises.

    Args:
        logits: `[..., C]` raw class logits.
        targets_onehot: `[..., C]` targets in [0, 1] (one-hot; background = all zeros).
        alpha: weight of the positive term, `1 - alpha` weighs the negatives; `< 0` disables it.
        gamma: focusing exponent on `(1 - p_t)`.

    Returns:
        `[..., C]` loss per element, computed in float32 (or float64) even under autocast.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        # (1 - p_t) ** gamma underflows in half precision; the loss is cheap next to the model.
        logits = logits.float()
    targets = targets_onehot.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def quality_focal_loss(logits: Tensor, quality_targets: Tensor, beta: float = 2.0) -> Tensor:
    """Elementwise quality focal loss; the caller sums and normalises.

    `BCE(sigmoid(x), t) * |t - sigmoid(x)| ** beta` with soft targets t: the IoU of the prediction
    with its gt on the positive (query, gt class) entries, 0 everywhere else. On the zeros this is
    `BCE(x, 0) * sigmoid(x) ** beta`, as mmdet's `QualityFocalLoss` (no alpha).

    Args:
        logits: `[..., C]` raw class logits.
        quality_targets: `[..., C]` soft targets in [0, 1] (detached IoUs; background = zeros).
        beta: focusing exponent on the distance to the target.

    Returns:
        `[..., C]` loss per element, in float32 (or float64) even under autocast.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = quality_targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return ce * (targets - logits.sigmoid()).abs().pow(beta)
