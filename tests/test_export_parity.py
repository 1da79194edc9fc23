"""The detections comparison of export parity: tied detections swapped between the runtimes are
compared with their partner, and a wrong box anywhere fails (`matched_box_diff`)."""
import torch
from export_tolerance import ORT_TOL as TOL  # the tie tolerance the export checks use

from codetr.export.parity import matched_box_diff



def _detections(generator, batch=2, k=30, classes=4):
    scores = torch.rand(batch, k, generator=generator).sort(dim=1, descending=True).values
    labels = torch.randint(0, classes, (batch, k), generator=generator)
    boxes = torch.rand(batch, k, 4, generator=generator)
    return scores, labels, boxes


def _swap(tensor, i, j):
    out = tensor.clone()
    out[:, [i, j]] = out[:, [j, i]]
    return out


def test_tied_swap_is_matched_and_a_wrong_swapped_box_is_caught():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores, labels, boxes = _detections(generator)
    labels[:, 5], labels[:, 6] = 0, 1                 # two detections of different classes ...
    scores[:, 6] = scores[:, 5] - TOL / 4             # ... whose scores tie within the tolerance
    noise = (torch.rand(boxes.shape, generator=generator) - 0.5) * TOL
    b_scores, b_labels, b_boxes = _swap(scores, 5, 6), _swap(labels, 5, 6), _swap(boxes, 5, 6) + noise
    assert not torch.equal(labels, b_labels)          # a rank-by-rank check would skip ranks 5, 6
    diff = matched_box_diff(scores, labels, boxes, b_scores, b_labels, b_boxes, TOL)
    assert diff <= noise.abs().max().item() + 1e-7
    b_boxes[1, 5, 2] += 0.1                           # the swapped detection's box is wrong
    diff = matched_box_diff(scores, labels, boxes, b_scores, b_labels, b_boxes, TOL)
    assert diff > 0.09


def test_detection_without_partner_is_infinite():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores, labels, boxes = _detections(generator)
    b_scores, b_labels = scores.clone(), labels.clone()
    b_labels[0, 3] = 9                                # a label eager never gave
    b_scores[1, 4] = 2.0                              # a score no eager detection has
    assert matched_box_diff(scores, labels, boxes, b_scores, labels, boxes, TOL) == float("inf")
    assert matched_box_diff(scores, labels, boxes, scores, b_labels, boxes, TOL) == float("inf")
    assert matched_box_diff(scores, labels, boxes, scores, labels, boxes, TOL) == 0.0
