"""codetr.tasks.coco_eval against pycocotools on random data."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

from codetr.tasks.coco_eval import evaluate_coco, format_table, load_ground_truth, to_coco_results


def seeded_rng() -> np.random.Generator:
    """A generator drawn from the per-test seed of conftest (fresh data, replayable)."""
    return np.random.default_rng(np.random.randint(2**31))


def random_coco(rng: np.random.Generator, num_images: int = 12, crowded: bool = True):
    """Ground truth with non-contiguous category ids and all three size ranges, plus detections
    made of jittered ground truth, misses and false positives.

    With `crowded`, one more 1000 x 1000 image holds 30 objects (10 per category) in its left half
    and 105 detections: 25 false positives per category in the right half (no overlap with any
    object) that outscore every true positive, then the 30 objects' jittered boxes. Its top 10
    per category are false positives, so AR10 < AR100 and the per-class APs at maxDets 10 and
    100 differ; the image has more than 100 detections in all."""
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
    if crowded:
        image_id = 100 + num_images
        images.append({"id": image_id, "width": 1000, "height": 1000, "file_name": "crowded.jpg"})
        for cat in (3, 7, 20):
            for _ in range(10):
                bw, bh = rng.uniform(20, 200, size=2)
                x, y = rng.uniform(0, 500 - bw), rng.uniform(0, 1000 - bh)
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat,
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
                ann_id += 1
                j = rng.normal(0, 0.03, size=4) * [bw, bh, bw, bh]
                dets.append({"image_id": image_id, "category_id": cat,
                             "bbox": [x + j[0], y + j[1], bw + j[2], bh + j[3]],
                             "score": float(rng.uniform(0.05, 0.4))})
            for _ in range(25):
                bw, bh = rng.uniform(10, 100, size=2)
                dets.append({"image_id": image_id, "category_id": cat,
                             "bbox": [rng.uniform(500, 1000 - bw), rng.uniform(0, 1000 - bh), bw, bh],
                             "score": float(rng.uniform(0.5, 1.0))})
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


# The order of pycocotools' `COCOeval.stats` (its `summarize()`: AP at IoU .5:.95, .5, .75, by
# area; AR at maxDets 1, 10, 100, then by area at maxDets 100), spelled out here rather than taken
# from STAT_NAMES so that a mislabelled name cannot hide.
PYCOCOTOOLS_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                     "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def test_same_numbers_as_pycocotools():
    gt, dets = random_coco(seeded_rng())
    ours = evaluate_coco(gt, dets)
    ref = pycocotools_stats(gt, dets)
    # atol 1e-6: faster-coco-eval reproduces pycocotools' arithmetic (measured max difference
    # 2.2e-16 over 200 seeds, stats and per-class AP); the bound only absorbs summation order.
    assert set(ours.stats) == set(PYCOCOTOOLS_ORDER)
    np.testing.assert_allclose([ours.stats[n] for n in PYCOCOTOOLS_ORDER], ref.stats, atol=1e-6)
    assert 0.1 < ours.stats["AP50"] < 1.0  # the data is neither trivial nor hopeless
    # The crowded image's objects are all ranked below its 10th detection of their class
    # (measured over 200 seeds: AR100 - AR10 >= 0.34, |AP@100 - AP@10| per class >= 0.067).
    assert ref.stats[7] < ref.stats[8] - 0.05 and ours.stats["AR10"] < ours.stats["AR100"] - 0.05
    precision = ref.eval["precision"]  # [T, R, K, A, M]; M = maxDets (1, 10, 100)
    # Per-class AP equals pycocotools run on that class alone (maxDets 100).
    for k, entry in enumerate(ours.per_class):
        alone = pycocotools_stats(gt, dets, cat_ids=[entry["category_id"]])
        assert entry["AP"] == pytest.approx(alone.stats[0], abs=1e-6)
        assert entry["AP50"] == pytest.approx(alone.stats[1], abs=1e-6)
        at_10 = precision[:, :, k, 0, 1]
        assert abs(alone.stats[0] - at_10[at_10 > -1].mean()) > 1e-3  # maxDets 10 would differ
    assert [c["name"] for c in ours.per_class] == ["circle", "square", "traffic light"]
    # The PR curve: 101 recall points at IoU 0.5, non-increasing precision (COCO interpolates).
    rec = [r for r, _ in ours.pr_curve]
    prec = np.array([p for _, p in ours.pr_curve])
    assert len(rec) == 101 and rec[0] == 0.0 and rec[-1] == pytest.approx(1.0)
    assert np.all(np.diff(prec) <= 1e-9) and prec.max() <= 1.0
    assert np.mean(prec) == pytest.approx(ours.stats["AP50"], abs=1e-6)
    assert "AP50" in format_table(ours) and "traffic light" in format_table(ours)


def test_empty_detections_give_zero_not_a_crash():
    gt, _ = random_coco(seeded_rng(), num_images=3, crowded=False)
    with pytest.raises(IndexError):  # the reason we handle it ourselves
        pycocotools_stats(gt, [])
    ours = evaluate_coco(gt, [])
    assert ours.stats["AP"] == 0.0 and ours.stats["AR100"] == 0.0
    # a class without any ground truth in the draw is -1 (COCO's "undefined"), the others 0;
    # crowd boxes are ignored ground truth, so a class with only crowd boxes is -1 as well
    present = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert {c["category_id"]: c["AP"] for c in ours.per_class} == {
        c["id"]: 0.0 if c["id"] in present else -1.0 for c in gt["categories"]}
    assert all(p == 0.0 for _, p in ours.pr_curve)


def test_to_coco_results_maps_labels_and_boxes():
    lut = np.array([-1, -1, -1, 3, -1, -1, -1, 7])  # contiguous_labels false: index = category id
    scores = torch.tensor([0.9, 0.3, 0.8, 0.7, 0.95, 0.85])
    # label 5 has no category; 8 and 12 lie past the table (not the last category 7): all dropped
    labels = torch.tensor([3, 7, 5, 7, 8, 12])
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0],
                          [1.0, 1.0, 2.0, 2.0], [30.0, 30.0, 31.5, 40.0],
                          [5.0, 5.0, 9.0, 9.0], [6.0, 6.0, 8.0, 8.0]])
    out = to_coco_results(42, scores, labels, boxes, lut, conf_threshold=0.5)
    assert [(d["category_id"], d["score"]) for d in out] == [(3, 0.9), (7, 0.7)]
    assert out[0]["bbox"] == [10.0, 20.0, 40.0, 60.0] and out[1]["bbox"] == [30.0, 30.0, 1.5, 10.0]
    assert all(d["image_id"] == 42 for d in out)


def test_merged_annotation_files_evaluate_as_one_dataset(tmp_path):
    """Two sources (multi-source val/test) whose annotation ids overlap, the first lacking one
    category: the merge evaluates like one COCO file built by hand (ids renumbered there)."""
    rng = seeded_rng()
    gt_a, dets_a = random_coco(rng, num_images=6, crowded=False)
    gt_a["annotations"] = [a for a in gt_a["annotations"] if a["category_id"] != 20]
    gt_a["categories"] = [c for c in gt_a["categories"] if c["id"] != 20]
    dets_a = [d for d in dets_a if d["category_id"] != 20]
    gt_b, dets_b = random_coco(rng, num_images=6, crowded=False)
    for img in gt_b["images"]:
        img["id"] += 1000
    for item in gt_b["annotations"] + dets_b:
        item["image_id"] += 1000
    ids_a = {a["id"] for a in gt_a["annotations"]}
    assert ids_a & {a["id"] for a in gt_b["annotations"]}  # both number from 1
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(files, (gt_a, gt_b)):
        path.write_text(json.dumps(data))

    assert load_ground_truth([files[0]]) == gt_a  # one file is used as is
    by_hand = {"images": gt_a["images"] + gt_b["images"],
               "annotations": [dict(a, id=i) for i, a in
                               enumerate(gt_a["annotations"] + gt_b["annotations"], start=1)],
               "categories": gt_b["categories"]}  # b's list is the union: ids 3, 7, 20
    dets = dets_a + dets_b
    ours = evaluate_coco(load_ground_truth(files), dets)
    ref = pycocotools_stats(by_hand, dets)
    np.testing.assert_allclose([ours.stats[n] for n in PYCOCOTOOLS_ORDER], ref.stats, atol=1e-6)  # as above
    assert [c["category_id"] for c in ours.per_class] == [3, 7, 20]
    for k, entry in enumerate(ours.per_class):
        ap = ref.eval["precision"][:, :, k, 0, -1]
        assert entry["AP"] == pytest.approx(ap[ap > -1].mean(), abs=1e-6)

    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({**gt_b, "images": gt_b["images"] + [dict(gt_a["images"][2])]}))
    clash_id = gt_a["images"][2]["id"]
    with pytest.raises(ValueError, match=f"image id {clash_id} is in both .*a.json and .*clash.json"):
        load_ground_truth([files[0], clash])
