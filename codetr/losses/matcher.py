"""Hungarian (one-to-one) matching of predicted queries to ground-truth boxes, as in DINO."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from codetr.boxes import box_cxcywh_to_xyxy, generalized_box_iou

# Stand-in for NaN/inf costs: a diverged prediction must lose every comparison, and scipy
# rejects non-finite matrices outright ("cost matrix is infeasible").
_INVALID_COST = 1e8


class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one assignment between queries and targets, per image.

    The cost is `cost_class * focal_class_cost + cost_bbox * L1(cxcywh) + cost_giou * -GIoU`,
    with DINO's focal class cost `alpha (1-p)^2 (-log p) - (1-alpha) p^2 (-log(1-p))` at the
    target class.
    Costs are always computed in float32 (autocast off): half-precision costs produce NaNs.
    """

    def __init__(self, cost_class: float, cost_bbox: float, cost_giou: float,
                 focal_alpha: float = 0.25) -> None:
        """Builds the matcher.

        Args:
            cost_class: weight of the focal classification cost.
            cost_bbox: weight of the L1 distance between cxcywh boxes.
            cost_giou: weight of the negative generalized IoU.
            focal_alpha: alpha of the focal cost (gamma is fixed to 2, as in DINO).
        """
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = 2.0

    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor,
                    tgt_boxes: Tensor) -> Tensor:
        """Matching cost of one image.

        Args:
            pred_logits: `[Q, C]` raw logits.
            pred_boxes: `[Q, 4]` cxcywh normalised.
            tgt_labels: `[N]` int64 label indices in [0, C).
            tgt_boxes: `[N, 4]` cxcywh normalised.

        Returns:
            `[Q, N]` float32 cost, non-finite entries replaced by a large finite value.
        """
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            prob = pred_logits.float().sigmoid()[:, tgt_labels]  # [Q, N]
            boxes = pred_boxes.float()
            tgt_boxes = tgt_boxes.to(device=boxes.device, dtype=torch.float32)
            alpha, gamma = self.focal_alpha, self.focal_gamma
            neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
            pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
            cost_class = pos - neg
            cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                             box_cxcywh_to_xyxy(tgt_boxes))
            cost = (self.cost_class * cost_class + self.cost_bbox * cost_bbox
                    + self.cost_giou * cost_giou)
        return torch.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST,
                                neginf=_INVALID_COST)

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor,
                targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Matches every image of the batch.

        Args:
            pred_logits: `[B, Q, C]` raw logits.
            pred_boxes: `[B, Q, 4]` cxcywh normalised.
            targets: B dicts with `labels` `[N_i]` int64 and `boxes` `[N_i, 4]` cxcywh normalised.

        Returns:
            B pairs `(pred_idx, tgt_idx)` of int64 CPU tensors of length `min(Q, N_i)`; query
            `pred_idx[k]` is matched to target `tgt_idx[k]` (pred_idx ascending). Images without
            boxes give empty tensors.
        """
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {pred_logits.shape[0]}")
        empty = torch.empty(0, dtype=torch.int64)
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        # One cost matrix of every query against every gt of the batch (elementwise the same
        # numbers as per image: each entry depends on one query and one gt), then each image's
        # block: a few large ops and one device-to-host copy instead of B of each.
        batch, num_queries = pred_logits.shape[:2]
        cost = self.cost_matrix(pred_logits.flatten(0, 1), pred_boxes.flatten(0, 1),
                                torch.cat([t["labels"] for t in targets]),
                                torch.cat([t["boxes"] for t in targets]))
        blocks = cost.view(batch, num_queries, -1).cpu().split(sizes, dim=-1)
        indices = []
        for i, block in enumerate(blocks):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices
