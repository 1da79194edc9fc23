"""onnxruntime against PyTorch eager on the same images: the numbers export is judged by.

The two-stage query selection is a top-k over every encoder location (8,500 at 640x640 with 4
levels), and proposals whose scores differ by less than the float noise between the runtimes
(about 1e-5) may come out in either order. Each rank is paired with its own learned content
query, so such a swap changes those queries' outputs by far more than the noise although both
runs are right. The comparison therefore reads the selection the ONNX graph made (its first
TopK, exposed as an extra output of a probe session), runs eager PyTorch on that same selection
(`codetr.model.two_stage.forced_selection`), and separately checks that the graph's selection
differs from eager's own only between proposals whose eager scores tie within the tolerance.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from torch import Tensor

from codetr.export.graph import DetectorGraph, topk_detections
from codetr.model.two_stage import forced_selection, proposal_scores


@dataclasses.dataclass
class Parity:
    """Largest differences between two runs of the same images.

    Attributes:
        max_score_diff: max |sigmoid(logit) - sigmoid(logit')| over images, queries and classes.
        max_box_diff: max |box - box'| of `pred_boxes` (cxcywh normalised).
        topk_labels_equal: the top-k (query, class) selections of every image have the same
            labels in the same order (exactly).
        topk_same_up_to_ties: at every rank of the top-k, the second run's pick scores (in the
            first run) within the tolerance of the first run's pick.
        topk: k of those comparisons.
        batch: images compared.
        tolerance: the tolerance `within` uses.
        selection_ranks_differing: ranks where the graph's query selection differs from eager's
            own (the scores above are compared on the graph's selection).
        selection_ties_only: every such rank holds a proposal whose eager score is within the
            tolerance of eager's own pick at that rank (a tie, not an error).
        own_selection_topk_labels_equal: the top-k labels of eager on ITS OWN selection equal the
            graph's exactly (what a user comparing the two runs sees; a tie can break it).
    """
    max_score_diff: float
    max_box_diff: float
    topk_labels_equal: bool
    topk_same_up_to_ties: bool
    topk: int
    batch: int
    tolerance: float
    selection_ranks_differing: int = 0
    selection_ties_only: bool = True
    own_selection_topk_labels_equal: bool = True

    def within(self) -> bool:
        """Scores and boxes within the tolerance, same top-k up to ties, selection up to ties."""
        return (self.max_score_diff <= self.tolerance and self.max_box_diff <= self.tolerance
                and self.topk_same_up_to_ties and self.selection_ties_only)


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


def probe_session(onnx_file: str | os.PathLike, threads: int | None = None):
    """A session of `onnx_file` with the indices of its first TopK (the query selection) as an
    extra last output; returns (session, True) or (plain session, False) when it has no TopK."""
    import onnx

    from codetr.export.onnx_runtime import make_session

    proto = onnx.load(os.fspath(onnx_file))
    topk = next((n for n in proto.graph.node if n.op_type == "TopK"), None)
    if topk is None:
        return make_session(onnx_file, threads=threads), False
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(topk.output[1]))
    return make_session(proto.SerializeToString(), threads=threads), True


def _selection(model: torch.nn.Module, images: Tensor, indices: Tensor,
               tolerance: float) -> tuple[int, bool, Tensor, Tensor]:
    """Eager on its own selection: (ranks where `indices` differ from its top-k, whether all are
    ties within the tolerance, its pred_logits, its pred_boxes)."""
    scores = {}

    def grab(module, args, output):  # the encoder class branch: [B, S, C] logits of every location
        if output.dim() == 3 and output.shape[1] >= indices.shape[1]:
            scores["rank"] = proposal_scores(output, model.query_head.transformer.proposal_classes)

    branch = model.query_head.cls_branches[-1]
    handle = branch.register_forward_hook(grab)
    try:
        with torch.no_grad():
            logits, boxes = DetectorGraph(model)(images)
    finally:
        handle.remove()
    own = scores["rank"].topk(indices.shape[1], dim=1)
    picked = scores["rank"].gather(1, indices)
    differ = own.indices != indices
    return int(differ.sum()), bool(((picked - own.values).abs() <= tolerance).all()), logits, boxes


@torch.no_grad()
def onnx_parity(model: torch.nn.Module, onnx_file: str | os.PathLike, images: Tensor, topk: int = 100,
                tolerance: float = 1e-3) -> Parity:
    """Runs `images` (`[B, 3, H, W]`, whole images) through PyTorch eager and the ONNX file.

    Args:
        model: the detector (`CoDETR`), on the CPU.
        onnx_file: its raw-output export.
        images: the batch; H x W must be the file's.
        topk: k of the label comparison.
        tolerance: see `Parity`.
    """
    session, probed = probe_session(onnx_file)
    outputs = session.run(None, {"images": images.numpy().astype(np.float32)})
    if not probed:
        logits, boxes = DetectorGraph(model)(images)
        return compare_outputs(logits, boxes, torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]),
                               topk, tolerance)
    indices = torch.from_numpy(outputs[2]).long()
    onnx_logits, onnx_boxes = torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1])
    differing, ties_only, own_logits, own_boxes = _selection(model, images, indices, tolerance)
    own = compare_outputs(own_logits, own_boxes, onnx_logits, onnx_boxes, topk, tolerance)
    with forced_selection(indices):
        logits, boxes = DetectorGraph(model)(images)
    parity = compare_outputs(logits, boxes, onnx_logits, onnx_boxes, topk, tolerance)
    return dataclasses.replace(parity, selection_ranks_differing=differing, selection_ties_only=ties_only,
                               own_selection_topk_labels_equal=own.topk_labels_equal)


@torch.no_grad()
def detections_parity(model: torch.nn.Module, onnx_file: str | os.PathLike, images: Tensor,
                      orig_sizes: Tensor, num_select: int, tolerance: float = 1e-3) -> Parity:
    """`DetectionsGraph` export against eager `topk_detections` of the same model.

    Eager runs on the graph's query selection (module docstring). Boxes are compared in pixels
    divided by the larger original side (normalised, as for the raw outputs); a rank where the
    labels differ must have scores within the tolerance (a tie), and every box is compared with
    its tied partner there (`matched_box_diff`), so a swap of two tied detections is no blind
    spot.
    """
    session, probed = probe_session(onnx_file)
    outputs = session.run(None, {"images": images.numpy().astype(np.float32),
                                 "orig_sizes": orig_sizes.numpy().astype(np.int64)})
    o_scores, o_labels, o_pixels = (torch.from_numpy(o) for o in outputs[:3])
    differing, ties_only = 0, True
    if probed:
        indices = torch.from_numpy(outputs[3]).long()
        differing, ties_only, _, _ = _selection(model, images, indices, tolerance)
        with forced_selection(indices):
            logits, boxes = DetectorGraph(model)(images)
    else:
        logits, boxes = DetectorGraph(model)(images)
    scores, labels, pixels = topk_detections(logits, boxes, orig_sizes, num_select)
    side = orig_sizes.max(1).values.float()[:, None, None]
    same = labels == o_labels
    return Parity(max_score_diff=(scores - o_scores).abs().max().item(),
                  max_box_diff=matched_box_diff(scores, labels, pixels / side, o_scores, o_labels,
                                                o_pixels / side, tolerance),
                  topk_labels_equal=bool(same.all()),
                  topk_same_up_to_ties=bool((same | ((scores - o_scores).abs() <= tolerance)).all()),
                  topk=int(labels.shape[1]), batch=len(images), tolerance=tolerance,
                  selection_ranks_differing=differing, selection_ties_only=ties_only)


def matched_box_diff(scores_a: Tensor, labels_a: Tensor, boxes_a: Tensor, scores_b: Tensor,
                     labels_b: Tensor, boxes_b: Tensor, tolerance: float) -> float:
    """Box difference of two ranked detection lists that may order tied detections differently.

    Every detection of b is paired with the nearest box among a's detections of its image with
    the same label and a score within `tolerance` (its own rank when nothing tied; a swapped
    partner when two scores tie); the result is the largest such distance (max over the 4
    coordinates), or inf when some detection of b has no such partner at all.

    Args:
        scores_a, scores_b: `[B, K]` scores.
        labels_a, labels_b: `[B, K]` labels.
        boxes_a, boxes_b: `[B, K, 4]` boxes in one unit (here xyxy pixels / the image's larger
            side).
    """
    candidate = ((labels_b[:, :, None] == labels_a[:, None, :])
                 & ((scores_b[:, :, None] - scores_a[:, None, :]).abs() <= tolerance))
    distance = (boxes_b[:, :, None, :] - boxes_a[:, None, :, :]).abs().amax(-1)
    nearest = distance.masked_fill(~candidate, float("inf")).amin(-1)
    return nearest.max().item() if nearest.numel() else 0.0
