"""Sigmoid focal loss (Lin et al. 2017), as DINO and the ATSS heads use it."""
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
