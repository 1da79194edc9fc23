"""DINO contrastive denoising (CDN) queries: noisy copies of the ground truth fed to the decoder.

Layout of the `pad_size = G * 2 * M` denoising queries (`M` = most gt boxes of one image in the
batch, `G` = groups): query `g*2M + j` is the positive noisy copy of gt `j` in group `g`,
`g*2M + M + j` its negative copy (to be classified as background). Slots with `j >= n_i` (image `i`
has fewer boxes) are padding: zero content, reference logits 0 (the box (0.5, 0.5, 0.5, 0.5)); the
criterion ignores them via `dn_meta`.

The label embedding has `num_classes` entries (no extra "unknown" entry): that is the Co-DINO
checkpoint layout (`query_head.label_embedding.weight` `[C, D]`); DINO's original `num_classes + 1`
only served DN-DETR's unused "no label" slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from codetr.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass
class DenoisingQueries:
    """Denoising queries to prepend to the matching queries.

    Attributes:
        content: `[B, pad_size, D]` label embeddings of the noisy labels.
        reference_unsig: `[B, pad_size, 4]` noisy cxcywh boxes in inverse-sigmoid space.
        attn_mask: `[pad_size + Q, pad_size + Q]` bool decoder self-attention mask, True = row
            query may NOT attend to the column query.
        meta: `{"num_groups": G, "max_gt": M, "pad_size": G * 2 * M}`.
    """

    content: Tensor
    reference_unsig: Tensor
    attn_mask: Tensor
    meta: dict[str, int]


def denoising_attn_mask(num_groups: int, max_gt: int, num_queries: int, device: torch.device) -> Tensor:
    """Self-attention mask for `G` denoising groups followed by `Q` matching queries.

    Matching queries cannot see any denoising query (those carry the ground truth); a denoising
    group sees itself and the matching queries but no other group (each group holds its own
    noisy copy of every gt, so seeing another group would reveal the answer).

    Returns:
        `[G*2M + Q, G*2M + Q]` bool, True = blocked.
    """
    pad_size = num_groups * 2 * max_gt
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // (2 * max_gt)
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


def build_denoising_queries(
    targets: Sequence[dict[str, Tensor]],
    label_embedding: nn.Embedding,
    num_classes: int,
    num_queries: int,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
) -> Optional[DenoisingQueries]:
    """Builds the contrastive denoising queries of a batch (DINO's `prepare_for_cdn`).

    Args:
        targets: B dicts with `labels` int64 `[n_i]` and `boxes` `[n_i, 4]` cxcywh normalised.
        label_embedding: `num_classes` x `D` embedding of (noisy) labels.
        num_classes: labels are flipped to a uniform random class in `[0, num_classes)`.
        num_queries: matching queries `Q` that follow the denoising ones (for the mask size).
        dn_number: denoising budget; groups `G = max(dn_number // M, 1)`.
        label_noise_ratio: each label is flipped with probability `label_noise_ratio * 0.5`.
        box_noise_scale: corners move by `+-U * (w/2, h/2) * scale`, `U ~ [0, 1)` for positive
            copies and `[1, 2)` for negative ones, then are clamped to [0, 1].

    Returns:
        The queries, or None when no image of the batch has a gt box (no denoising then).
    """
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts, default=0)
    if max_gt == 0:
        return None
    device = targets[0]["boxes"].device
    batch = len(targets)
    groups = max(dn_number // max_gt, 1)
    valid = torch.zeros(batch, max_gt, dtype=torch.bool, device=device)
    labels = torch.zeros(batch, max_gt, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, max_gt, 4, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        valid[i, :n] = True
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"].to(boxes.dtype)

    # [B, G, 2 (positive, negative), M]
    labels = labels[:, None, None].expand(batch, groups, 2, max_gt).clone()
    boxes = boxes[:, None, None].expand(batch, groups, 2, max_gt, 4).clone()
    valid = valid[:, None, None].expand(batch, groups, 2, max_gt)

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint(0, num_classes, labels.shape, device=device)
        labels = torch.where(flip, random_labels, labels)

    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        half_wh = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2  # (w/2, h/2, w/2, h/2)
        sign = torch.randint(0, 2, boxes.shape, device=device).to(boxes.dtype) * 2.0 - 1.0
        magnitude = torch.rand(boxes.shape, device=device)
        magnitude[:, :, 1] += 1.0  # negatives move further: U in [1, 2)
        corners = (corners + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(corners)

    content = label_embedding(labels) * valid[..., None].to(label_embedding.weight.dtype)
    reference_unsig = torch.where(valid[..., None], inverse_sigmoid(boxes), torch.zeros_like(boxes))
    pad_size = groups * 2 * max_gt
    return DenoisingQueries(
        content=content.reshape(batch, pad_size, -1),
        reference_unsig=reference_unsig.reshape(batch, pad_size, 4),
        attn_mask=denoising_attn_mask(groups, max_gt, num_queries, device),
        meta={"num_groups": groups, "max_gt": max_gt, "pad_size": pad_size},
    )
