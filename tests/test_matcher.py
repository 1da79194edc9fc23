"""HungarianMatcher: brute force over all assignments, empty targets, AMP, non-finite costs."""
import itertools

import pytest
import torch
from torchvision import ops

from codetr.losses.focal import sigmoid_focal_loss
from codetr.losses.matcher import HungarianMatcher


def _random_targets(n: int, num_classes: int) -> dict:
    centre = torch.rand(n, 2) * 0.6 + 0.2
    wh = torch.rand(n, 2) * 0.3 + 0.05
    return {"labels": torch.randint(0, num_classes, (n,)), "boxes": torch.cat([centre, wh], 1)}


def _reference_cost(logits, boxes, target, w_class, w_bbox, w_giou, alpha=0.25):
    """DINO's cost written independently: torchvision GIoU, explicit L1, focal terms."""
    prob = logits.sigmoid()[:, target["labels"]]
    pos = alpha * (1 - prob) ** 2 * -(prob + 1e-8).log()
    neg = (1 - alpha) * prob ** 2 * -(1 - prob + 1e-8).log()
    l1 = (boxes[:, None, :] - target["boxes"][None, :, :]).abs().sum(-1)
    giou = ops.generalized_box_iou(ops.box_convert(boxes, "cxcywh", "xyxy"),
                                   ops.box_convert(target["boxes"], "cxcywh", "xyxy"))
    return w_class * (pos - neg) + w_bbox * l1 - w_giou * giou


def _brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost over every injective map target -> query."""
    q, n = cost.shape
    if q >= n:
        return min(sum(cost[p[j], j].item() for j in range(n))
                   for p in itertools.permutations(range(q), n))
    return min(sum(cost[i, p[i]].item() for i in range(q))
               for p in itertools.permutations(range(n), q))


@pytest.mark.parametrize("num_queries,sizes", [(6, [4, 1, 3]), (5, [2, 5, 0]), (3, [4, 2])])
def test_matches_brute_force(num_queries, sizes):
    num_classes = 5
    weights = (2.0, 5.0, 2.0)
    matcher = HungarianMatcher(*weights, focal_alpha=0.25)
    batch = len(sizes)
    logits = torch.randn(batch, num_queries, num_classes) * 2
    boxes = torch.cat([torch.rand(batch, num_queries, 2) * 0.6 + 0.2,
                       torch.rand(batch, num_queries, 2) * 0.3 + 0.05], -1)
    targets = [_random_targets(n, num_classes) for n in sizes]
    indices = matcher(logits, boxes, targets)
    assert len(indices) == batch
    for i, (pred_idx, tgt_idx) in enumerate(indices):
        assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
        assert len(pred_idx) == len(tgt_idx) == min(num_queries, sizes[i])
        if sizes[i] == 0:
            continue
        assert len(set(pred_idx.tolist())) == len(pred_idx)
        assert len(set(tgt_idx.tolist())) == len(tgt_idx)
        cost = _reference_cost(logits[i], boxes[i], targets[i], *weights)
        torch.testing.assert_close(matcher.cost_matrix(logits[i], boxes[i], targets[i]["labels"],
                                                       targets[i]["boxes"]), cost)
        matched = cost[pred_idx, tgt_idx].sum().item()
        assert matched == pytest.approx(_brute_force(cost), abs=1e-5)


def test_focal_cost_is_the_focal_loss_difference():
    """The class cost is the focal loss of 'positive' minus that of 'negative' for the class."""
    logits = torch.randn(4, 3)
    target = _random_targets(2, 3)
    matcher = HungarianMatcher(1.0, 0.0, 0.0)
    cost = matcher.cost_matrix(logits, torch.rand(4, 4) * 0.5 + 0.1, target["labels"],
                               target["boxes"])
    chosen = logits[:, target["labels"]]
    expected = (sigmoid_focal_loss(chosen, torch.ones_like(chosen), 0.25)
                - sigmoid_focal_loss(chosen, torch.zeros_like(chosen), 0.25))
    torch.testing.assert_close(cost, expected, atol=1e-6, rtol=1e-5)


def test_all_targets_empty():
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    empty = {"labels": torch.empty(0, dtype=torch.int64), "boxes": torch.empty(0, 4)}
    indices = matcher(torch.randn(2, 7, 3), torch.rand(2, 7, 4), [empty, empty])
    for pred_idx, tgt_idx in indices:
        assert pred_idx.numel() == 0 and tgt_idx.numel() == 0
        assert pred_idx.dtype == torch.int64


def test_non_finite_predictions_are_never_preferred():
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    target = _random_targets(2, 3)
    logits = torch.randn(1, 4, 3)
    boxes = torch.rand(1, 4, 4) * 0.4 + 0.1
    boxes[0, 1] = float("nan")
    logits[0, 2] = float("nan")
    (pred_idx, tgt_idx), = matcher(logits, boxes, [target])
    assert sorted(pred_idx.tolist()) == [0, 3]


def test_cost_is_float32_under_autocast():
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    target = _random_targets(3, 4)
    logits = torch.randn(6, 4)
    boxes = torch.rand(6, 4) * 0.4 + 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(logits.bfloat16(), boxes.bfloat16(), target["labels"],
                                   target["boxes"])
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()
