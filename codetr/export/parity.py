"""onnxruntime against PyTorch eager on the same images: the numbers export is judged by."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from codetr.export.graph import DetectorGraph, topk_detections


@dataclasses.dataclass
class Parity:
    """Largest differences between two runs of the same images.

    Attributes:
        max_score_diff: max |sigmoid(logit) - sigmoid(logit')| over images, queries and classes.
        max_box_diff: max |box - box'| of `pred_boxes` (cxcywh normalised).
        topk_labels_equal: the top-k (query, class) selections of every image have the same
            labels in the same order (exactly).
        topk_same_up_to_ties: at every rank of the top-k, the second run's pick scores (in the
            first run) within the tolerance of the first run's pick: the rankings agree except
            where two candidates tie within the numerical noise (random models have such ties).
        topk: k of those comparisons.
        batch: images compared.
        tolerance: the tolerance `topk_same_up_to_ties` and `within` use.
    """
    max_score_diff: float
    max_box_diff: float
    topk_labels_equal: bool
    topk_same_up_to_ties: bool
    topk: int
    batch: int
    tolerance: float

    def within(self) -> bool:
        """Scores and boxes within the tolerance and the same top-k ranking up to ties."""
        return (self.max_score_diff <= self.tolerance and self.max_box_diff <= self.tolerance
                and self.topk_same_up_to_ties)


def compare_outputs(logits_a: Tensor, boxes_a: Tensor, logits_b: Tensor, boxes_b: Tensor,
                    topk: int = 100, tolerance: float = 1e-3) -> Parity:
    """Parity of two `(pred_logits [B, Q, C], pred_boxes [B, Q, 4] cxcywh)` pairs (a = reference)."""
    prob_a, prob_b = logits_a.float().sigmoid().flatten(1), logits_b.float().sigmoid().flatten(1)
    num_classes = logits_a.shape[-1]
    k = min(topk, prob_a.shape[1])
    scores_a, index_a = prob_a.topk(k, dim=1)
    _, index_b = prob_b.topk(k, dim=1)
    ties_ok = ((prob_a.gather(1, index_b) - scores_a).abs() <= tolerance).all().item()
    return Parity(max_score_diff=(prob_a - prob_b).abs().max().item(),
                  max_box_diff=(boxes_a.float() - boxes_b.float()).abs().max().item(),
                  topk_labels_equal=bool(torch.equal(index_a % num_classes, index_b % num_classes)),
                  topk_same_up_to_ties=bool(ties_ok), topk=k, batch=len(logits_a), tolerance=tolerance)


@torch.no_grad()
def onnx_parity(model: torch.nn.Module, session, images: Tensor, topk: int = 100,
                tolerance: float = 1e-3) -> Parity:
    """Runs `images` (`[B, 3, H, W]`, whole images) through PyTorch eager and an ONNX session.

    Args:
        model: the detector (`CoDETR`), on the CPU.
        session: an onnxruntime session of its raw-output export.
        images: the batch; H x W must be the file's.
        topk: k of the label comparison.
        tolerance: see `Parity`.
    """
    logits, boxes = DetectorGraph(model)(images)
    onnx_logits, onnx_boxes = session.run(None, {"images": images.numpy().astype(np.float32)})
    return compare_outputs(logits, boxes, torch.from_numpy(onnx_logits), torch.from_numpy(onnx_boxes), topk,
                           tolerance)


@torch.no_grad()
def detections_parity(model: torch.nn.Module, session, images: Tensor, orig_sizes: Tensor,
                      num_select: int, tolerance: float = 1e-3) -> Parity:
    """`DetectionsGraph` export against eager `topk_detections` of the same model.

    Boxes are compared in pixels divided by the larger original side (normalised, as for the
    raw outputs). Ties: a rank where the labels differ must have scores within the tolerance.
    """
    logits, boxes = DetectorGraph(model)(images)
    scores, labels, pixels = topk_detections(logits, boxes, orig_sizes, num_select)
    o_scores, o_labels, o_pixels = session.run(None, {"images": images.numpy().astype(np.float32),
                                                      "orig_sizes": orig_sizes.numpy().astype(np.int64)})
    o_scores, o_labels = torch.from_numpy(o_scores), torch.from_numpy(o_labels)
    side = orig_sizes.max(1).values.float()[:, None, None]
    box = ((pixels - torch.from_numpy(o_pixels)).abs() / side).max().item()
    score = (scores - o_scores).abs().max().item()
    return Parity(max_score_diff=score, max_box_diff=box, topk_labels_equal=bool(torch.equal(labels, o_labels)),
                  topk_same_up_to_ties=bool(((labels == o_labels) | ((scores - o_scores).abs() <= tolerance)).all()),
                  topk=int(labels.shape[1]), batch=len(images), tolerance=tolerance)
