"""codetr.tasks.coco_eval against pycocotools on random data."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

from codetr.tasks.coco_eval import STAT_NAMES, evaluate_coco, format_table, to_coco_results


def random_coco(rng: np.random.Generator, num_images: int = 12):
    """Ground truth with non-contiguous category ids and all three size ranges, plus detections
    made of jittered ground truth, misses and false positives."""
    cats = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 20, "name": "traffic light"}]
    images, anns, dets = [], [], []
    ann_id = 1
    for i in range(num_images):
        w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        images.append({"id": 100 + i, "width": w, "height": h, "file_name": f"{i}.jpg"})
        for _ in range(int(rng.integers(1, 6))):
            bw, bh = rng.uniform(8, 150, size=2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = int(rng.choice([3, 7, 20]))
            anns.append({"id": ann_id, "image_id": 100 + i, "category_id": cat,
                         "bbox": [x, y, bw, bh], "area": bw * bh * rng.uniform(0.6, 1.0),
                         "iscrowd": int(rng.random() < 0.05)})
            ann_id += 1
            if rng.random() < 0.8:  # detected, with jitter, sometimes the wrong class
                j = rng.normal(0, 0.08, size=4) * [bw, bh, bw, bh]
                dcat = cat if rng.random() < 0.85 else int(rng.choice([3, 7, 20]))
                dets.append({"image_id": 100 + i, "category_id": dcat,
                             "bbox": [x + j[0], y + j[1], max(1.0, bw + j[2]), max(1.0, bh + j[3])],
                             "score": float(rng.uniform(0.2, 1.0))})
        for _ in range(int(rng.integers(0, 4))):  # false positives
            bw, bh = rng.uniform(8, 100, size=2)
            dets.append({"image_id": 100 + i, "category_id": int(rng.choice([3, 7, 20])),
                         "bbox": [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                         "score": float(rng.uniform(0.0, 0.6))})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def pycocotools_stats(gt, dets, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = PyCOCO()
        coco.dataset = {k: list(v) for k, v in gt.items()}
        coco.createIndex()
        ev = PyCOCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_same_numbers_as_pycocotools():
    gt, dets = random_coco(np.random.default_rng(0))
    ours = evaluate_coco(gt, dets)
    ref = pycocotools_stats(gt, dets)
    np.testing.assert_allclose([ours.stats[n] for n in STAT_NAMES], ref.stats, atol=1e-6)
    assert 0.1 < ours.stats["AP50"] < 1.0  # the data is neither trivial nor hopeless
    # Per-class AP equals pycocotools run on that class alone.
    for entry in ours.per_class:
        alone = pycocotools_stats(gt, dets, cat_ids=[entry["category_id"]])
        assert entry["AP"] == pytest.approx(alone.stats[0], abs=1e-6)
        assert entry["AP50"] == pytest.approx(alone.stats[1], abs=1e-6)
    assert [c["name"] for c in ours.per_class] == ["circle", "square", "traffic light"]
    # The PR curve: 101 recall points at IoU 0.5, non-increasing precision (COCO interpolates).
    rec = [r for r, _ in ours.pr_curve]
    prec = np.array([p for _, p in ours.pr_curve])
    assert len(rec) == 101 and rec[0] == 0.0 and rec[-1] == pytest.approx(1.0)
    assert np.all(np.diff(prec) <= 1e-9) and prec.max() <= 1.0
    assert np.mean(prec) == pytest.approx(ours.stats["AP50"], abs=1e-6)
    assert "AP50" in format_table(ours) and "traffic light" in format_table(ours)


def test_empty_detections_give_zero_not_a_crash():
    gt, _ = random_coco(np.random.default_rng(1), num_images=3)
    with pytest.raises(IndexError):  # the reason we handle it ourselves
        pycocotools_stats(gt, [])
    ours = evaluate_coco(gt, [])
    assert ours.stats["AP"] == 0.0 and ours.stats["AR100"] == 0.0
    assert all(c["AP"] == 0.0 for c in ours.per_class)
    assert all(p == 0.0 for _, p in ours.pr_curve)


def test_to_coco_results_maps_labels_and_boxes():
    lut = np.array([-1, -1, -1, 3, -1, -1, -1, 7])  # contiguous_labels false: index = category id
    scores = torch.tensor([0.9, 0.3, 0.8, 0.7])
    labels = torch.tensor([3, 7, 5, 7])  # label 5 has no category: dropped
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0],
                          [1.0, 1.0, 2.0, 2.0], [30.0, 30.0, 31.5, 40.0]])
    out = to_coco_results(42, scores, labels, boxes, lut, conf_threshold=0.5)
    assert [(d["category_id"], d["score"]) for d in out] == [(3, 0.9), (7, 0.7)]
    assert out[0]["bbox"] == [10.0, 20.0, 40.0, 60.0] and out[1]["bbox"] == [30.0, 30.0, 1.5, 10.0]
    assert all(d["image_id"] == 42 for d in out)
