"""DINO contrastive denoising (CDN) queries: noisy copies of the ground truth fed to the decoder.

Layout of the `pad_size = G * 2 * M` denoising queries (`M` = most gt boxes of one image in the
batch, `G` = groups): query `g*2M + j` is the positive noisy copy of gt `j` in group `g`,
`g*2M + M + j` its negative copy (to be classified as background). Slots with `j >= n_i` (image `i`
has fewer boxes) are padding: zero content, reference logits 0 (the box (0.5, 0.5, 0.5, 0.5)); the
criterion scores them as background, as mmdet does (label `num_classes`, weight 1).

The random draws are mmdet's `CdnQueryGenerator`'s, call for call, so a seed gives mmdet's noisy
queries (tests/test_denoising.py against a transcription of its steps, and
tests/test_training_parity_model.py against the official model's `dn_loss_*`).

The label embedding has `num_classes` entries (no extra "unknown" entry): that is the Co-DINO
checkpoint layout (`query_head.label_embedding.weight` `[C, D]`); DINO's original `num_classes + 1`
only served DN-DETR's unused "no label" slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from codetr.boxes import DENOISING_EPS, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


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
            copies and `[1, 2)` for negative ones, then are clamped to [0, 1]; the reference
            logits use `DENOISING_EPS` (1e-3, mmdet's), so a clamped border box starts at -6.9.

    Returns:
        The queries, or None when no image of the batch has a gt box (no denoising then).
    """
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts, default=0)
    if max_gt == 0:
        return None
    device = targets[0]["boxes"].device
    batch, total = len(targets), sum(counts)
    groups = max(dn_number // max_gt, 1)
    copies = 2 * groups  # copy k = 2g + s: group g, s = 0 positive, 1 negative
    # The batch's gts as one list [N] (image by image), repeated: row k * N + t is copy k of gt t.
    # The noise is drawn as mmdet's CdnQueryGenerator draws it: the same calls, shapes and order
    # over this list.
    labels = torch.cat([t["labels"].to(device, torch.long) for t in targets]).repeat(copies)  # [2G*N]
    boxes = torch.cat([t["boxes"].to(device, torch.get_default_dtype()) for t in targets])
    boxes = boxes.repeat(copies, 1)  # [2G*N, 4] cxcywh

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        chosen = flip.nonzero().view(-1)
        labels = labels.scatter(0, chosen, torch.randint(0, num_classes, chosen.shape, device=device))

    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(boxes)
        sign = torch.randint(0, 2, corners.shape, dtype=corners.dtype, device=device) * 2.0 - 1.0
        magnitude = torch.rand(corners.shape, dtype=corners.dtype, device=device)
        negative = (torch.arange(copies, device=device) % 2 == 1).repeat_interleave(total)
        magnitude[negative] += 1.0  # negatives move further: U in [1, 2)
        wh = boxes[:, 2:].repeat(1, 2)  # (w, h, w, h)
        corners = (corners + (magnitude * sign) * wh * box_noise_scale / 2).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(corners)

    # Into the [B, 2G, M] layout of the module docstring (= [B, G, 2, M]); the rest is padding.
    image = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)])
    slot = torch.cat([torch.arange(n) for n in counts])
    index = (image.repeat(copies).to(device),
             torch.arange(copies).repeat_interleave(total).to(device), slot.repeat(copies).to(device))
    valid = torch.zeros(batch, copies, max_gt, dtype=torch.bool, device=device)
    valid[index] = True
    grid_labels = torch.zeros(batch, copies, max_gt, dtype=torch.long, device=device)
    grid_labels[index] = labels
    grid_boxes = torch.zeros(batch, copies, max_gt, 4, dtype=boxes.dtype, device=device)
    grid_boxes[index] = inverse_sigmoid(boxes, DENOISING_EPS)  # padding stays 0: box (0.5, ...)

    content = label_embedding(grid_labels) * valid[..., None].to(label_embedding.weight.dtype)
    pad_size = copies * max_gt
    return DenoisingQueries(
        content=content.reshape(batch, pad_size, -1),
        reference_unsig=grid_boxes.reshape(batch, pad_size, 4),
        attn_mask=denoising_attn_mask(groups, max_gt, num_queries, device),
        meta={"num_groups": groups, "max_gt": max_gt, "pad_size": pad_size},
    )
