"""Assignments of the query head's groups: which query is supervised by which gt box.

One per kind of group of `SetCriterion`: Hungarian matching (matching queries), the fixed
`dn_meta` layout (denoising queries), the co-head's own assignment (customized positive queries).
"""
from __future__ import annotations

import torch
from torch import Tensor

# (batch_idx [K], query_idx [K], tgt_labels [K], tgt_boxes [K, 4] cxcywh): query
# (batch_idx[k], query_idx[k]) is supervised by class tgt_labels[k] and box tgt_boxes[k].
Assignment = tuple[Tensor, Tensor, Tensor, Tensor]


def hungarian_assignment(indices: list[tuple[Tensor, Tensor]], targets: list[dict[str, Tensor]],
                         device: torch.device) -> Assignment:
    """Flattens per-image matcher indices into an `Assignment` on `device`."""
    batch_idx, query_idx, labels, boxes = [], [], [], []
    for i, ((pred_idx, tgt_idx), target) in enumerate(zip(indices, targets)):
        pred_idx, tgt_idx = pred_idx.to(device), tgt_idx.to(device)
        batch_idx.append(torch.full_like(pred_idx, i))
        query_idx.append(pred_idx)
        labels.append(target["labels"][tgt_idx])
        boxes.append(target["boxes"][tgt_idx])
    return _concat(batch_idx, query_idx, labels, boxes, device)


def denoising_assignment(dn_meta: dict, targets: list[dict[str, Tensor]],
                         device: torch.device) -> Assignment:
    """The fixed assignment of the denoising queries (docs/DESIGN.md layout).

    Query `g * 2M + j` is the positive copy of gt j in group g and is supervised by gt j; query
    `g * 2M + M + j` (negative copy) and the padding slots `j >= n_i` stay background.

    Args:
        dn_meta: `{"num_groups": G, "max_gt": M, "pad_size": G * 2M}`.
        targets: B dicts with `labels` `[n_i]`, `boxes` `[n_i, 4]` cxcywh; n_i <= M.
        device: where the index tensors go.
    """
    groups, max_gt = int(dn_meta["num_groups"]), int(dn_meta["max_gt"])
    group_start = torch.arange(groups, device=device) * (2 * max_gt)  # [G]
    batch_idx, query_idx, labels, boxes = [], [], [], []
    for i, target in enumerate(targets):
        n = len(target["labels"])
        if n > max_gt:
            raise ValueError(f"image {i} has {n} gt boxes but dn_meta max_gt is {max_gt}")
        gt = torch.arange(n, device=device)
        query_idx.append((group_start[:, None] + gt[None, :]).flatten())  # [G * n], group-major
        batch_idx.append(torch.full((groups * n,), i, dtype=torch.int64, device=device))
        labels.append(target["labels"].repeat(groups))
        boxes.append(target["boxes"].repeat(groups, 1))
    return _concat(batch_idx, query_idx, labels, boxes, device)


def positive_assignment(pos_targets: dict[str, Tensor], num_classes: int) -> Assignment:
    """The assignment of customized positive queries: every non-background slot is positive.

    Args:
        pos_targets: `labels` `[B, N]` int64 (num_classes = background) and `boxes` `[B, N, 4]`
            cxcywh normalised (ignored on background slots).
        num_classes: the background label.
    """
    labels, boxes = pos_targets["labels"], pos_targets["boxes"]
    positive = labels != num_classes  # [B, N]
    batch_idx, query_idx = positive.nonzero(as_tuple=True)
    return batch_idx, query_idx, labels[positive], boxes[positive]


def _concat(batch_idx: list[Tensor], query_idx: list[Tensor], labels: list[Tensor],
            boxes: list[Tensor], device: torch.device) -> Assignment:
    """Concatenates per-image pieces; an empty batch gives empty tensors of the right dtype."""
    if not batch_idx:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty, empty, torch.empty(0, 4, device=device)
    return (torch.cat(batch_idx), torch.cat(query_idx), torch.cat(labels).long(),
            torch.cat(boxes))
