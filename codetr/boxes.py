"""Pure box functions shared by the model, the losses and the post-processing.

Formats: `cxcywh` is (centre x, centre y, width, height); `xyxy` is (x1, y1, x2, y2) with
x1 <= x2 and y1 <= y2. The functions are unit-agnostic (normalised or pixels) and differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Guards the IoU/GIoU divisions: degenerate (zero-area) boxes would give 0/0 = NaN otherwise,
# which poisons the Hungarian costs and the losses. Far below any real box area.
_AREA_EPS = 1e-12


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Converts boxes from cxcywh to xyxy.

    Args:
        boxes: `[..., 4]` cxcywh.

    Returns:
        `[..., 4]` xyxy, same dtype and device.
    """
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Converts boxes from xyxy to cxcywh.

    Args:
        boxes: `[..., 4]` xyxy.

    Returns:
        `[..., 4]` cxcywh, same dtype and device.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of `[..., 4]` xyxy boxes -> `[...]`."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of two sets of xyxy boxes.

    Args:
        boxes_a: `[N, 4]` xyxy.
        boxes_b: `[M, 4]` xyxy.

    Returns:
        `(iou [N, M], union [N, M])`.
    """
    area_a = box_area(boxes_a)
    area_b = box_area(boxes_b)
    top_left = torch.max(boxes_a[:, None, :2], boxes_b[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # [N, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=_AREA_EPS), union


def generalized_box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of two sets of xyxy boxes.

    Args:
        boxes_a: `[N, 4]` xyxy.
        boxes_b: `[M, 4]` xyxy.

    Returns:
        `[N, M]` GIoU in [-1, 1].
    """
    iou, union = box_iou(boxes_a, boxes_b)
    top_left = torch.min(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.max(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=_AREA_EPS)


def elementwise_box_iou(boxes_a: Tensor, boxes_b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU of matching pairs: `diag(box_iou(a, b))` without the N x N cost.

    Args:
        boxes_a: `[N, 4]` xyxy.
        boxes_b: `[N, 4]` xyxy.

    Returns:
        `[N]` IoU in [0, 1] and `[N]` union areas.
    """
    wh = (torch.min(boxes_a[:, 2:], boxes_b[:, 2:]) - torch.max(boxes_a[:, :2], boxes_b[:, :2]))
    wh = wh.clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes_a) + box_area(boxes_b) - inter
    return inter / union.clamp(min=_AREA_EPS), union


def elementwise_generalized_box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Generalized IoU of matching pairs: `diag(generalized_box_iou(a, b))` without the N x N cost.

    Args:
        boxes_a: `[N, 4]` xyxy.
        boxes_b: `[N, 4]` xyxy.

    Returns:
        `[N]` GIoU in [-1, 1].
    """
    iou, union = elementwise_box_iou(boxes_a, boxes_b)
    wh_c = (torch.max(boxes_a[:, 2:], boxes_b[:, 2:]) - torch.min(boxes_a[:, :2], boxes_b[:, :2]))
    wh_c = wh_c.clamp(min=0)
    enclosing = wh_c[:, 0] * wh_c[:, 1]
    return iou - (enclosing - union) / enclosing.clamp(min=_AREA_EPS)


# The eps of the box-refinement logit (decoder reference refinement, final boxes). mmdet's
# DinoTransformerDecoder and CoDINOHead use 1e-3 there (as DINO does), so the official weights
# were trained with it: with 1e-5, boxes within ~1e-3 of the image border come out differently
# and the difference grows through the decoder layers (../shared/reference/mmdet-codino,
# `decoder_stress`). The positive queries and learned references keep 1e-5, as mmdet.
REFINE_EPS = 1e-3
DEFORMABLE_REFINE_EPS = 1e-5  # mmdet's inverse_sigmoid default: Deformable DETR's refinement
# The eps of the denoising queries' noisy boxes (mmdet's CdnQueryGenerator, DINO): a noisy box
# clamped to the border (w = 0, x = 0) starts at logit -6.9, not -11.5.
DENOISING_EPS = 1e-3


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of `x` clamped to [0, 1]; `eps` keeps the result finite at 0 and 1.

    Args:
        x: any shape, values expected in [0, 1].
        eps: lower bound of both `x` and `1 - x` inside the log.

    Returns:
        `log(x / (1 - x))`, same shape.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
