"""Losses of the collaborative ATSS head and the positive samples it hands to the decoder.

Follows mmdet's `ATSSHead.loss` (used unchanged by Co-DETR's `CoATSSHead`): sigmoid focal loss
on every anchor of the padded batch, GIoU on the decoded boxes of the positives weighted by their
centerness target, and a centerness BCE on the positives. Terms are returned UNWEIGHTED (mmdet's Co-DINO
config multiplies GIoU by 2 relative to the others; the caller owns all weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from codetr.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from codetr.losses.atss_assigner import atss_assign, valid_anchor_masks
from codetr.losses.focal import sigmoid_focal_loss

# mmdet's DeltaXYWHBBoxCoder settings of the ATSS head.
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)
# mmdet's delta2bbox clamp: a box never grows or shrinks by more than 1000/16 per side in one go,
# so exp() cannot overflow on a wild early prediction.
_MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))


@dataclass
class PositiveSamples:
    """One image's positive anchors with their assigned gts, plus its negatives for padding.

    Attributes:
        anchors: `[P, 4]` xyxy pixels, the positive anchors.
        labels: `[P]` int64 label indices of the assigned gts.
        gt_boxes: `[P, 4]` xyxy pixels, the assigned gt boxes.
        neg_anchors: `[M, 4]` xyxy pixels, the anchors assigned to the background, in anchor
            order (mmdet's padding pool).
        feats: `[P, D]` the co-head's feature at each positive (Co-DETR's `with_coord_feat`:
            the map's row at the anchor; an R-CNN RoI's pooled mean), or None when not asked for.
        neg_feats: `[R, D]` a table holding the features of `neg_anchors` (ATSS: every anchor's
            row, a view; R-CNN: the image's kept RoIs), or None.
        neg_rows: `[M]` int64, the row of each of `neg_anchors` in `neg_feats` (given with it):
            only the few drawn as padding are ever gathered (`build_positive_queries`).
    """
    anchors: Tensor
    labels: Tensor
    gt_boxes: Tensor
    neg_anchors: Tensor
    feats: Optional[Tensor] = None
    neg_feats: Optional[Tensor] = None
    neg_rows: Optional[Tensor] = None


def delta_xywh_encode(anchors_xyxy: Tensor, boxes_xyxy: Tensor,
                      stds: Sequence[float] = DELTA_STDS) -> Tensor:
    """mmdet DeltaXYWH encoding (means 0) of boxes relative to anchors.

    Args:
        anchors_xyxy: `[N, 4]` xyxy pixels.
        boxes_xyxy: `[N, 4]` xyxy pixels.
        stds: the coder's stds (ATSS / RoI head: `DELTA_STDS`; RPN: all 1).

    Returns:
        `[N, 4]` deltas (dx, dy, dw, dh) divided by the stds.
    """
    stds = anchors_xyxy.new_tensor(stds)
    anchor_wh = anchors_xyxy[:, 2:] - anchors_xyxy[:, :2]
    anchor_c = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
    box_wh = boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]
    box_c = (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2
    deltas = torch.cat(((box_c - anchor_c) / anchor_wh, torch.log(box_wh / anchor_wh)), dim=-1)
    return deltas / stds


def delta_xywh_decode(anchors_xyxy: Tensor, deltas: Tensor,
                      stds: Sequence[float] = DELTA_STDS) -> Tensor:
    """Inverse of `delta_xywh_encode`, with mmdet's clamp of the log size ratios.

    Args:
        anchors_xyxy: `[N, 4]` xyxy pixels.
        deltas: `[N, 4]` (dx, dy, dw, dh) in units of the stds.
        stds: the coder's stds (ATSS / RoI head: `DELTA_STDS`; RPN: all 1).

    Returns:
        `[N, 4]` xyxy pixels (not clipped to the image, as in ATSS training).
    """
    deltas = deltas * deltas.new_tensor(stds)
    anchor_wh = anchors_xyxy[:, 2:] - anchors_xyxy[:, :2]
    anchor_c = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
    centre = anchor_c + anchor_wh * deltas[:, :2]
    wh = anchor_wh * deltas[:, 2:].clamp(min=-_MAX_LOG_RATIO, max=_MAX_LOG_RATIO).exp()
    return torch.cat((centre - wh / 2, centre + wh / 2), dim=-1)


def centerness_targets(anchors_xyxy: Tensor, gt_boxes_xyxy: Tensor) -> Tensor:
    """FCOS centerness of each anchor centre inside its assigned gt.

    Args:
        anchors_xyxy: `[P, 4]` xyxy pixels; each centre lies strictly inside its gt.
        gt_boxes_xyxy: `[P, 4]` xyxy pixels.

    Returns:
        `[P]` in (0, 1]: `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`.
    """
    centre = (anchors_xyxy[:, :2] + anchors_xyxy[:, 2:]) / 2
    left_top = centre - gt_boxes_xyxy[:, :2]  # [P, 2] (l, t)
    right_bottom = gt_boxes_xyxy[:, 2:] - centre  # [P, 2] (r, b)
    ratio = torch.min(left_top, right_bottom) / torch.max(left_top, right_bottom)
    return torch.sqrt(ratio[:, 0] * ratio[:, 1])


def _mean_over_ranks(value: Tensor) -> Tensor:
    """Mean of a scalar over the distributed ranks (itself when not distributed)."""
    value = value.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def _flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """`[B, K, H_l, W_l]` per level -> `[B, sum_l H_l * W_l, K]`, rows in (level, y, x) order."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps],
                     dim=1)


def atss_losses(cls_scores: Sequence[Tensor], deltas: Sequence[Tensor],
                centerness: Sequence[Tensor], anchors: Sequence[Tensor],
                targets: Sequence[dict], num_classes: int, focal_alpha: float = 0.25,
                gamma: float = 2.0, topk: int = 9, per_level: bool = False,
                feature_maps: Optional[Sequence[Tensor]] = None
                ) -> tuple[dict[str, Tensor], list[PositiveSamples]]:
    """ATSS assignment and losses for a batch, plus the positives of every image.

    Args:
        cls_scores: per level `[B, C, H_l, W_l]` raw class logits.
        deltas: per level `[B, 4, H_l, W_l]` DeltaXYWH box deltas (after the level's Scale).
        centerness: per level `[B, 1, H_l, W_l]` raw centerness logits.
        anchors: per level `[H_l * W_l, 4]` xyxy pixels, rows in (y, x) order, shared by all
            images.
        targets: B dicts with `boxes` `[N, 4]` cxcywh normalised by `size`, `labels` `[N]`
            int64, `size` `[2]` (h, w) of the unpadded image and, optionally, `pad_size`
            `(h, w)` ints: the image's own padded extent (`codetr.data.collate.pad_size`); anchors
            centred beyond it lie over another image's padding and are invalid, as mmdet's valid
            flags (from its per-image `pad_shape`) make them: never candidates, zero focal weight.
            Without `pad_size` every anchor of the padded batch is valid.
        num_classes: number of class logits `C`.
        focal_alpha: focal loss alpha.
        gamma: focal loss gamma.
        topk: ATSS candidates per level and gt.
        per_level: return each term as its `[L]` per-level parts instead (mmdet's per-level
            log; same normalisers, so they sum to the scalars).
        feature_maps: per level `[B, D, H_l, W_l]` maps (the head's input) whose row at each
            anchor becomes `PositiveSamples.feats` / `neg_feats` (not detached, as mmdet's
            `get_aux_targets`); None: no features.

    Returns:
        `(losses, positives)`: `losses` has scalar `loss_cls`, `loss_bbox` (GIoU) and
        `loss_centerness`, unweighted (`[L]` with `per_level`); `positives` has one
        `PositiveSamples` per image.
    """
    cls_flat = _flatten_levels(cls_scores)  # [B, A, C]
    deltas_flat = _flatten_levels(deltas)  # [B, A, 4]
    ctr_flat = _flatten_levels(centerness)[..., 0]  # [B, A]
    anchors_all = torch.cat(list(anchors), dim=0).to(cls_flat.device).float()  # [A, 4]
    counts = [a.shape[0] for a in anchors]
    batch, num_anchors = cls_flat.shape[:2]
    if anchors_all.shape[0] != num_anchors or len(targets) != batch:
        raise ValueError(f"{anchors_all.shape[0]} anchors / {len(targets)} targets for "
                         f"predictions of shape {tuple(cls_flat.shape)}")

    labels = torch.full((batch, num_anchors), num_classes, dtype=torch.long,
                        device=cls_flat.device)
    matched_gt = anchors_all.new_zeros(batch, num_anchors, 4)
    masks = valid_anchor_masks(anchors_all, [t.get("pad_size") for t in targets])
    valid_rows = {b: m for b, m in enumerate(masks) if m is not None}  # images with invalid anchors
    for b, target in enumerate(targets):
        pad_hw = target["pad_size"] if b in valid_rows else None  # None: the unmasked assignment
        # (w, h, w, h) from the (h, w) size on the device: no host sync per image.
        scale = target["size"].to(anchors_all).flip(0).repeat(2)
        gt_xyxy = box_cxcywh_to_xyxy(target["boxes"].to(anchors_all)) * scale
        # Anchors over this image's own padding (up to `pad_size`) stay valid, as in mmdet.
        gt_index, gt_label = atss_assign(anchors_all, counts, gt_xyxy, target["labels"], topk=topk,
                                         valid_hw=pad_hw)
        if gt_xyxy.shape[0] == 0:
            continue
        # torch.where instead of boolean-mask indexing: the same values, no nonzero() sync.
        positive = gt_index >= 0
        labels[b] = torch.where(positive, gt_label, labels[b])
        matched_gt[b] = torch.where(positive[:, None], gt_xyxy[gt_index.clamp(min=0)], matched_gt[b])
    positive = labels < num_classes  # [B, A]

    # All three terms share the positive count of the whole (distributed) batch, as mmdet; each
    # level's sum is divided by it (mmdet logs the levels separately; their sum is the loss).
    num_pos = _mean_over_ranks(positive.sum().float()).clamp(min=1.0)
    onehot = F.one_hot(labels, num_classes + 1)[..., :num_classes]  # background -> all zeros
    focal = sigmoid_focal_loss(cls_flat, onehot, alpha=focal_alpha, gamma=gamma)  # [B, A, C]
    if valid_rows:  # mmdet's label weight 0 for invalid anchors
        weight = torch.ones(batch, num_anchors, device=focal.device, dtype=focal.dtype)
        for b, valid in valid_rows.items():
            weight[b] = valid.to(focal.dtype)
        focal = focal * weight[..., None]
    cls_per_level = _per_level(focal.sum(dim=(0, 2)), counts) / num_pos

    pos_anchors = anchors_all.expand(batch, -1, -1)[positive]  # [P, 4]
    pos_gt = matched_gt[positive]  # [P, 4]
    ctr_target = centerness_targets(pos_anchors, pos_gt)  # [P]
    pos_boxes = delta_xywh_decode(pos_anchors, deltas_flat[positive].float())
    giou = elementwise_generalized_box_iou(pos_boxes, pos_gt)
    # mmdet clamps this normaliser at 1 too, so a handful of off-centre positives is not blown up.
    ctr_sum = _mean_over_ranks(ctr_target.sum()).clamp(min=1.0)
    pos_level = _level_index(counts, cls_flat.device).expand(batch, -1)[positive]  # [P]
    bbox_per_level = _sum_by_level((1 - giou) * ctr_target, pos_level, len(counts)) / ctr_sum
    ctr_bce = F.binary_cross_entropy_with_logits(ctr_flat[positive].float(), ctr_target, reduction="none")
    ctr_per_level = _sum_by_level(ctr_bce, pos_level, len(counts)) / num_pos

    rows = None if feature_maps is None else _flatten_levels(feature_maps)  # [B, A, D]
    positives = [
        PositiveSamples(anchors=anchors_all[positive[b]], labels=labels[b, positive[b]],
                        gt_boxes=matched_gt[b, positive[b]],
                        neg_anchors=anchors_all[~positive[b]],
                        feats=None if rows is None else rows[b, positive[b]],
                        neg_feats=None if rows is None else rows[b],
                        neg_rows=None if rows is None else (~positive[b]).nonzero()[:, 0])
        for b in range(batch)
    ]
    losses = {"loss_cls": cls_per_level, "loss_bbox": bbox_per_level, "loss_centerness": ctr_per_level}
    if not per_level:
        losses = {name: value.sum() for name, value in losses.items()}
    return losses, positives


def _level_index(counts: Sequence[int], device: torch.device) -> Tensor:
    """`[A]` int64: the pyramid level of every anchor (levels concatenated in order)."""
    # output_size given: no device-to-host sync on CUDA.
    return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                   torch.tensor(list(counts), device=device), output_size=sum(counts))


def _per_level(values: Tensor, counts: Sequence[int]) -> Tensor:
    """`[A]` per-anchor values -> `[L]` sums over each level's anchors."""
    return torch.stack([part.sum() for part in values.split(list(counts))])


def _sum_by_level(values: Tensor, level: Tensor, num_levels: int) -> Tensor:
    """`[P]` values of positives on levels `level` `[P]` -> `[L]` per-level sums (0 when empty)."""
    return values.new_zeros(num_levels).index_add(0, level, values)
