"""The synthetic shapes dataset: determinism, COCO validity, content."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codetr.data.synthetic import SHAPE_IDS, categories, generate, render_image


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(tmp_path / name, 12, 4, 3, image_size=64, seed=seed)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 12 + 4 + 3 + 3 + 1  # images + 3 annotation files + classmap
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) >= 19  # every image and annotation file changes


def test_an_image_does_not_depend_on_how_many_images_follow(tmp_path):
    generate(tmp_path / "small", 3, 0, 0, image_size=64, seed=1)
    generate(tmp_path / "large", 9, 0, 0, image_size=64, seed=1)
    for name in ("train_000000.jpg", "train_000002.jpg"):
        small = (tmp_path / "small" / "train" / "images" / name).read_bytes()
        assert small == (tmp_path / "large" / "train" / "images" / name).read_bytes()


def test_coco_content(tmp_path):
    classes = ("square", "circle", "star", "cross", "triangle")
    out = generate(tmp_path, 150, 10, 0, image_size=96, seed=3, classes=classes, empty_prob=0.1)
    coco = out["train"]
    assert json.loads((tmp_path / "train" / "annotations.json").read_text()) == coco
    cat_ids = [c["id"] for c in coco["categories"]]
    assert cat_ids == sorted(SHAPE_IDS[c] for c in classes)
    assert cat_ids != list(range(1, len(cat_ids) + 1))  # non-contiguous on purpose
    assert (tmp_path / "classmap.txt").read_text().split() == [c["name"] for c in coco["categories"]]
    assert [im["id"] for im in coco["images"]] == list(range(1, 151))
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))  # ids from 1, unique
    assert {a["category_id"] for a in anns} == set(cat_ids)  # every class appears
    per_image = np.bincount([a["image_id"] for a in anns], minlength=151)[1:]
    assert (per_image == 0).sum() >= 5  # empty images exist
    assert per_image.max() >= 4  # and crowded ones
    boxes = np.array([a["bbox"] for a in anns])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 96).all() and (boxes[:, 1] + boxes[:, 3] <= 96).all()
    assert boxes[:, 2].min() <= 8 and boxes[:, 2].max() >= 30  # small to large
    assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in anns)
    for im in coco["images"][:5]:
        with Image.open(tmp_path / "train" / "images" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"]) == (96, 96) and img.mode == "RGB"


def test_pycocotools_reads_it_and_scores_ground_truth_as_perfect(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = generate(tmp_path, 0, 40, 0, image_size=128, seed=2)["val"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "val" / "annotations.json"))
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": 1.0} for a in coco["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_box_is_the_tight_box_of_the_shape_pixels():
    # shapes are filled with one flat colour over a noisy background: the pixels of the most
    # common colour inside the box are the shape, and their bounding box is the annotation
    for seed in range(10):
        rng = np.random.default_rng(seed)
        img, objs = render_image(rng, 128, ("triangle", "ring", "star"), 1, 0.0, 8.0, 0.5)
        assert len(objs) == 1
        x, y, w, h = (int(v) for v in objs[0]["bbox"])
        colours, counts = np.unique(np.asarray(img)[y:y + h, x:x + w].reshape(-1, 3),
                                    axis=0, return_counts=True)
        fill = colours[counts.argmax()]
        ys, xs = np.nonzero((np.asarray(img) == fill).all(-1))
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]


def test_occluded_objects_stay_mostly_visible():
    rng = np.random.default_rng(0)
    overlaps = 0
    for _ in range(60):
        _, objs = render_image(rng, 128, ("circle", "square"), 6, 0.0, 8.0, 0.5)
        b = np.array([o["bbox"] for o in objs])
        x1, y1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
        ix = np.minimum(x1[:, None], x1[None]) - np.maximum(b[:, None, 0], b[None, :, 0])
        iy = np.minimum(y1[:, None], y1[None]) - np.maximum(b[:, None, 1], b[None, :, 1])
        inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
        np.fill_diagonal(inter, 0)
        overlaps += int((inter > 0).sum())
    assert overlaps > 0  # overlapping objects do occur


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        categories(("circle", "hexagon"))
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, 1, 0, 0, image_size=16)
