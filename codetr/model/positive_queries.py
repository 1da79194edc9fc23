"""Customized positive queries of Co-DETR (training only).

An auxiliary head's positive anchors become extra decoder queries whose reference box is the
anchor and whose target is the gt the head assigned to it (no Hungarian matching). Every image
gets the same number N of queries: random subsample when it has more positives, random
background anchors as padding when fewer (Co-DETR's `get_aux_targets`, non-zero padding).
Boxes are normalised by the unpadded image size and not clamped, as mmdet.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from codetr.boxes import box_xyxy_to_cxcywh
from codetr.losses.atss_loss import PositiveSamples


def _normalise(boxes_xyxy: Tensor, h: float, w: float) -> Tensor:
    """`[K, 4]` xyxy pixels -> `[K, 4]` cxcywh normalised by (h, w), NOT clamped.

    As mmdet's `get_aux_targets`: an anchor larger than the image keeps w or h > 1, and the
    decoder sees it as it is (its refinement's `inverse_sigmoid` clamps to [0, 1] by itself).
    """
    scale = boxes_xyxy.new_tensor([w, h, w, h])
    return box_xyxy_to_cxcywh(boxes_xyxy / scale)


def _random_indices(population: int, count: int, generator: Optional[torch.Generator]
                    ) -> Tensor:
    """`count` distinct random indices below `population` (with repeats if it is too small)."""
    if count <= population:
        return torch.randperm(population, generator=generator)[:count]
    return torch.randint(population, (count,), generator=generator)


def build_positive_queries(positives: Sequence[PositiveSamples], image_sizes: Tensor,
                           num_classes: int, min_queries: int = 9, max_queries: int = 300,
                           generator: Optional[torch.Generator] = None
                           ) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
    """Turns one auxiliary head's positives into padded positive queries and their targets.

    Args:
        positives: B `PositiveSamples` (xyxy pixels), e.g. from `CoATSSHead.loss_and_positives`.
        image_sizes: `[B, 2]` (h, w) of the unpadded images, pixels (the targets' `size`).
        num_classes: number of class logits; this is also the background label of the pads.
        min_queries: lower bound of N.
        max_queries: upper bound of N.
        generator: CPU random generator for the subsampling and padding (None: global RNG).

    Returns:
        `(pos_boxes, targets, pos_feats)`: `pos_boxes` `[B, N, 4]` cxcywh normalised, the anchors
        (the queries' reference boxes); `targets` with `labels` `[B, N]` int64 (`num_classes` for
        pads) and `boxes` `[B, N, 4]` cxcywh normalised (the assigned gts; pads carry their own
        anchor, a valid box that no loss should use); `pos_feats` `[B, N, D]` the samples'
        `feats` / `neg_feats` rows of the same anchors (mmdet's `aux_feats`), or None when the
        samples carry none. N = clip(max positives, min, max).
    """
    if len(positives) != image_sizes.shape[0]:
        raise ValueError(f"{len(positives)} positives for {image_sizes.shape[0]} image sizes")
    device = image_sizes.device
    most = max((p.anchors.shape[0] for p in positives), default=0)
    num_queries = min(max(most, min_queries), max_queries)

    all_boxes, all_labels, all_targets, all_feats = [], [], [], []
    for sample, (h, w) in zip(positives, image_sizes.tolist()):
        anchors, labels, gt_boxes, feats = sample.anchors, sample.labels, sample.gt_boxes, sample.feats
        if anchors.shape[0] > num_queries:
            keep = _random_indices(anchors.shape[0], num_queries, generator).to(anchors.device)
            anchors, labels, gt_boxes = anchors[keep], labels[keep], gt_boxes[keep]
            feats = None if feats is None else feats[keep]
        num_pad = num_queries - anchors.shape[0]
        pads = sample.neg_anchors
        # No background anchor to draw from (never in a real image): pad with the image box.
        no_negatives = pads.shape[0] == 0
        if no_negatives:
            pads = anchors.new_tensor([[0.0, 0.0, w, h]])
        # Draw only when padding is needed, as mmdet: an image with exactly N positives leaves the
        # generator untouched, so the next image's draws are mmdet's for the same seed.
        pad_index = (_random_indices(pads.shape[0], num_pad, generator).to(pads.device)
                     if num_pad > 0 else pads.new_zeros(0, dtype=torch.long))
        pads = pads[pad_index]
        if feats is not None:  # only the drawn negatives' rows are gathered (zeros for the image box)
            pad_feats = (feats.new_zeros(num_pad, feats.shape[1]) if no_negatives else
                         sample.neg_feats[sample.neg_rows.to(pad_index.device)[pad_index]])
            all_feats.append(torch.cat((feats, pad_feats.to(feats.device))))

        boxes = _normalise(torch.cat((anchors, pads)).float(), h, w)
        all_boxes.append(boxes)
        pad_targets = boxes[anchors.shape[0]:]
        all_targets.append(torch.cat((_normalise(gt_boxes.float(), h, w), pad_targets)))
        all_labels.append(torch.cat((labels.long(), labels.new_full((num_pad,), num_classes))))

    pos_boxes = torch.stack(all_boxes).to(device)
    targets = {"labels": torch.stack(all_labels).to(device),
               "boxes": torch.stack(all_targets).to(device)}
    if all_feats and len(all_feats) != len(positives):
        raise ValueError("some images' positives carry features and others none")
    pos_feats = torch.stack(all_feats).to(device) if all_feats else None
    return pos_boxes, targets, pos_feats
