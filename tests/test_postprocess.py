"""Soft-NMS vs a plain Python loop and torchvision NMS; PostProcess vs a per-image loop."""
import math

import pytest
import torch
from torchvision import ops

from codetr.postprocess import PostProcess, batched_soft_nms, soft_nms


def _py_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _py_soft_nms(boxes, scores, method, iou_threshold, sigma, score_threshold):
    """mmcv's soft-NMS loop in plain Python: pick the max, decay the rest, drop low scores."""
    boxes, scores = boxes.tolist(), scores.tolist()
    live = [i for i in range(len(scores)) if scores[i] > score_threshold]
    keep, new_scores = [], []
    while live:
        best = max(live, key=lambda j: scores[j])
        keep.append(best)
        new_scores.append(scores[best])
        live.remove(best)
        for j in live:
            iou = _py_iou(boxes[best], boxes[j])
            if method == "linear":
                scores[j] *= (1 - iou) if iou > iou_threshold else 1.0
            else:
                scores[j] *= math.exp(-iou * iou / sigma)
        live = [j for j in live if scores[j] > score_threshold]
    return keep, new_scores


def _random_boxes(n: int) -> torch.Tensor:
    """Boxes crowded in a 100 x 100 area so that many overlap."""
    top_left = torch.rand(n, 2, dtype=torch.float64) * 80
    wh = torch.rand(n, 2, dtype=torch.float64) * 40 + 5
    return torch.cat([top_left, top_left + wh], 1)


@pytest.mark.parametrize("method,iou_threshold,sigma", [
    ("linear", 0.3, 0.5), ("linear", 0.0, 0.5), ("gaussian", 0.0, 0.5), ("gaussian", 0.0, 0.1)])
def test_soft_nms_matches_python_loop(method, iou_threshold, sigma):
    boxes = _random_boxes(40)
    scores = torch.rand(40, dtype=torch.float64) * 0.9 + 0.05
    keep, new_scores = soft_nms(boxes, scores, method, iou_threshold, sigma, 0.05)
    ref_keep, ref_scores = _py_soft_nms(boxes, scores, method, iou_threshold, sigma, 0.05)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(new_scores, torch.tensor(ref_scores, dtype=torch.float64))
    assert (new_scores[1:] <= new_scores[:-1]).all()
    assert (new_scores < scores[keep] - 1e-9).any()  # the crowded boxes do decay


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_batched_soft_nms_equals_per_class_loop(method):
    boxes = _random_boxes(50)
    scores = torch.rand(50, dtype=torch.float64) * 0.9 + 0.05
    labels = torch.randint(0, 3, (50,))
    keep, new_scores = batched_soft_nms(boxes, scores, labels, method, 0.2, 0.3, 0.05)
    merged = []
    for c in range(3):
        idx = (labels == c).nonzero().flatten()
        k, s = _py_soft_nms(boxes[idx], scores[idx], method, 0.2, 0.3, 0.05)
        merged += [(score, idx[j].item()) for j, score in zip(k, s)]
    merged.sort(key=lambda x: -x[0])
    assert keep.tolist() == [i for _, i in merged]
    torch.testing.assert_close(new_scores, torch.tensor([s for s, _ in merged],
                                                        dtype=torch.float64))


def _clusters(num_clusters: int, per_cluster: int, jitter: float) -> torch.Tensor:
    """Clusters 100 px apart (IoU 0 across clusters), boxes inside a cluster overlap heavily."""
    centres = torch.arange(num_clusters, dtype=torch.float64)[:, None] * 100 + 50
    base = torch.cat([centres - 20, centres - 20, centres + 20, centres + 20], 1)  # diagonal
    boxes = base[:, None, :] + (torch.rand(num_clusters, per_cluster, 4) - 0.5) * 2 * jitter
    return boxes.reshape(-1, 4)


def test_soft_nms_reduces_to_hard_nms():
    """Overlaps are either 0 or large: a sharp gaussian or linear on duplicates is hard NMS."""
    scores = torch.rand(20, dtype=torch.float64) * 0.9 + 0.1
    boxes = _clusters(5, 4, jitter=2.0)  # IoU inside a cluster >= ~0.7
    keep, new_scores = soft_nms(boxes, scores, "gaussian", 0.0, 0.01)
    hard = ops.nms(boxes, scores, 0.5)
    assert keep.tolist() == hard.tolist()
    torch.testing.assert_close(new_scores, scores[hard])

    duplicates = _clusters(5, 3, jitter=0.0)
    scores = torch.rand(15, dtype=torch.float64) * 0.9 + 0.1
    keep, new_scores = soft_nms(duplicates, scores, "linear", 0.0, 0.5)
    assert keep.tolist() == ops.nms(duplicates, scores, 0.5).tolist()
    assert len(keep) == 5


def test_soft_nms_edge_cases():
    keep, scores = soft_nms(torch.empty(0, 4), torch.empty(0), "linear", 0.5, 0.5)
    assert keep.numel() == 0 and scores.numel() == 0
    keep, scores = soft_nms(_random_boxes(3), torch.tensor([0.5, 0.0005, 0.2]), "gaussian",
                            0.0, 0.5)
    assert 1 not in keep.tolist()
    with pytest.raises(ValueError, match="method"):
        soft_nms(_random_boxes(3), torch.rand(3), "hard", 0.5, 0.5)


def _loop_postprocess(logits, boxes, sizes, k):
    """Per image: sort all (query, class) scores in Python, convert each box coordinate by hand."""
    results = []
    for i in range(logits.shape[0]):
        prob = logits[i].sigmoid()
        q_count, c_count = prob.shape
        pairs = sorted(((prob[q, c].item(), q, c) for q in range(q_count)
                        for c in range(c_count)), key=lambda x: -x[0])[:k]
        h, w = sizes[i].tolist()
        out_boxes = []
        for _, q, _ in pairs:
            cx, cy, bw, bh = boxes[i, q].tolist()
            x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
            out_boxes.append([min(max(x1 * w, 0), w), min(max(y1 * h, 0), h),
                              min(max(x2 * w, 0), w), min(max(y2 * h, 0), h)])
        results.append({"scores": torch.tensor([p[0] for p in pairs]),
                        "labels": torch.tensor([p[2] for p in pairs]),
                        "boxes": torch.tensor(out_boxes)})
    return results


@pytest.mark.parametrize("num_select", [10, 1000])
def test_postprocess_matches_per_image_loop(num_select):
    logits = torch.randn(3, 12, 5) * 3
    boxes = torch.rand(3, 12, 4) * 0.8 + 0.1  # some extend past the image: clamping matters
    sizes = torch.tensor([[480, 640], [300, 200], [123, 457]])
    post = PostProcess(num_select, False, "linear", 0.8, 0.5)
    results = post({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}, sizes)
    expected = _loop_postprocess(logits, boxes, sizes, min(num_select, 60))
    assert len(results) == 3
    for got, ref in zip(results, expected):
        torch.testing.assert_close(got["scores"], ref["scores"])
        assert got["labels"].dtype == torch.int64
        assert got["labels"].tolist() == ref["labels"].tolist()
        torch.testing.assert_close(got["boxes"], ref["boxes"], rtol=1e-5, atol=1e-3)


def test_postprocess_with_soft_nms():
    logits = torch.randn(2, 30, 3) * 2
    # Queries crowded around a few places so that same-class duplicates exist.
    boxes = torch.cat([torch.rand(2, 30, 2) * 0.2 + 0.4, torch.rand(2, 30, 2) * 0.2 + 0.2], -1)
    sizes = torch.tensor([[200, 300], [250, 250]])
    plain = PostProcess(40, False, "gaussian", 0.8, 0.5)(
        {"pred_logits": logits, "pred_boxes": boxes}, sizes)
    post = PostProcess(40, True, "gaussian", 0.8, 0.5)
    results = post({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for got, ref in zip(results, plain):
        keep, scores = batched_soft_nms(ref["boxes"], ref["scores"], ref["labels"], "gaussian",
                                        0.8, 0.5)
        torch.testing.assert_close(got["scores"], scores)
        assert got["labels"].tolist() == ref["labels"][keep].tolist()
        torch.testing.assert_close(got["boxes"], ref["boxes"][keep])
        assert (got["scores"] < ref["scores"][keep] - 1e-6).any()  # crowded: scores decayed


def test_postprocess_rejects_bad_arguments():
    with pytest.raises(ValueError):
        PostProcess(0, False, "linear", 0.8, 0.5)
    with pytest.raises(ValueError):
        PostProcess(10, True, "hard", 0.8, 0.5)
