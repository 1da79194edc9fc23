"""Loading and validating one COCO source: agreement with pycocotools and every bad input."""
import json
import re

import numpy as np
import pytest
from pycocotools.coco import COCO

from codetr.data.coco import CocoFormatError, DataWarning, clip_boxes, load_coco
from data_fixtures import edit_coco, make_coco


def test_matches_pycocotools(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=5, seed=11)
    src = load_coco(json_file, image_dir)
    ref = COCO(str(json_file))
    assert src.image_ids.tolist() == [img["id"] for img in ref.dataset["images"]]
    assert src.stats["negative_images"] == 1
    for i, image_id in enumerate(src.image_ids.tolist()):
        rec = src.record(i)
        anns = ref.loadAnns(ref.getAnnIds(imgIds=[image_id]))
        assert rec.ann_ids.tolist() == [a["id"] for a in anns]
        assert rec.category_ids.tolist() == [a["category_id"] for a in anns]
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        np.testing.assert_allclose(rec.boxes, expected, rtol=1e-5, atol=1e-4)
        info = ref.loadImgs([image_id])[0]
        assert (rec.height, rec.width) == (info["height"], info["width"])
        assert rec.path == str(image_dir / info["file_name"])


def test_boxes_clipped_and_degenerate_dropped_with_counts(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=1, sizes=[(50, 60)], boxes_per_image=[1])
    cat = 1
    boxes = {1: [10, 10, 20, 20],      # fine
             2: [-5, 40, 20, 30],      # sticks out left and bottom: clipped to [0, 40, 15, 50]
             3: [10, 10, 0, 5],        # w = 0: dropped
             4: [10, 10, 5, -3],       # h < 0: dropped
             5: [70, 10, 5, 5],        # entirely right of the image: dropped
             6: [5, 5, float("nan"), 4]}  # not finite: dropped (json writes NaN)
    anns = [{"id": k, "image_id": 1, "category_id": cat, "bbox": b, "iscrowd": 0} for k, b in boxes.items()]
    edit_coco(json_file, annotations=anns)
    with pytest.warns(DataWarning) as record:
        src = load_coco(json_file, image_dir)
    messages = " ".join(str(w.message) for w in record)
    assert "dropped 4 of 6 annotations" in messages and "clipped 1 boxes" in messages
    rec = src.record(0)
    assert rec.ann_ids.tolist() == [1, 2]
    np.testing.assert_allclose(rec.boxes, [[10, 10, 30, 30], [0, 40, 15, 50]])
    assert src.stats["dropped"] == 4 and src.stats["clipped"] == 1


def test_clip_boxes_random_against_direct_formula():
    rng = np.random.default_rng(3)
    xywh = rng.uniform(-50, 150, (200, 4))
    h, w = rng.uniform(20, 100, 200), rng.uniform(20, 100, 200)
    xyxy, keep, _ = clip_boxes(xywh, h, w)
    x1 = np.clip(xywh[:, 0], 0, w)
    x2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, w)
    y1 = np.clip(xywh[:, 1], 0, h)
    y2 = np.clip(xywh[:, 1] + xywh[:, 3], 0, h)
    np.testing.assert_allclose(xyxy, np.stack([x1, y1, x2, y2], 1))
    np.testing.assert_array_equal(keep, (x2 > x1) & (y2 > y1))
    assert 0 < keep.sum() < 200


def test_crowd_kept_in_records(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=2, boxes_per_image=[3, 1], seed=2)
    data = json.loads(json_file.read_text())
    data["annotations"][1]["iscrowd"] = 1
    edit_coco(json_file, annotations=data["annotations"])
    src = load_coco(json_file, image_dir)
    assert src.record(0).iscrowd.tolist() == [False, True, False]
    assert src.stats["crowd"] == 1


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(CocoFormatError, match=r"broken.json:3:\d+: malformed JSON"):
        load_coco(path, tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.json does not exist"):
        load_coco(tmp_path / "nothere.json", tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(CocoFormatError, match="top level must be an object"):
        load_coco(path, tmp_path)


@pytest.mark.parametrize("case, match", [
    ("dup_image", "duplicate image id 1"),
    ("dup_ann", "duplicate annotation id 1"),
    ("ann_zero", "annotation id 0 is not allowed"),
    ("unknown_category", r"annotation id 1 has category_id 42, which is not in 'categories'"),
    ("unknown_image", r"annotation id 1 refers to image id 999"),
    ("bad_bbox", r"annotation id 1 bbox \[1, 2, 3\] must be"),
    ("dotdot", r"file_name '../outside.png' must be a relative path inside image_dir"),
    ("absolute", r"file_name '/etc/passwd' must be a relative path"),
    ("float_id", "image id 1.5 must be an integer"),
    ("negative_category", "category id -1 is negative"),
])
def test_invalid_content_errors_name_file_and_entry(tmp_path, case, match):
    json_file, image_dir = make_coco(tmp_path, n_images=2, boxes_per_image=[2, 1], seed=5)
    data = json.loads(json_file.read_text())
    images, anns = data["images"], data["annotations"]
    if case == "dup_image":
        images[1]["id"] = images[0]["id"]
    elif case == "dup_ann":
        anns[1]["id"] = anns[0]["id"]
    elif case == "ann_zero":
        anns[2]["id"] = 0
    elif case == "unknown_category":
        anns[0]["category_id"] = 42
    elif case == "unknown_image":
        anns[0]["image_id"] = 999
    elif case == "bad_bbox":
        anns[0]["bbox"] = [1, 2, 3]
    elif case == "dotdot":
        images[0]["file_name"] = "../outside.png"
    elif case == "absolute":
        images[0]["file_name"] = "/etc/passwd"
    elif case == "float_id":
        images[0]["id"] = 1.5
    categories = data["categories"]
    if case == "negative_category":  # the category and its boxes, consistently renumbered
        old, categories[0]["id"] = categories[0]["id"], -1
        for ann in anns:
            ann["category_id"] = -1 if ann["category_id"] == old else ann["category_id"]
    edit_coco(json_file, images=images, annotations=anns, categories=categories)
    with pytest.raises(CocoFormatError, match=match) as err:
        load_coco(json_file, image_dir)
    assert str(json_file) in str(err.value)


def test_missing_image_files_found_up_front(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=3, seed=6)
    (image_dir / "img_6_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 image files listed in .* are missing, "
                                                r"e.g. .*img_6_1.png"):
        load_coco(json_file, image_dir)
    assert len(load_coco(json_file, image_dir, check_files=False)) == 3


def test_missing_size_read_from_header(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=2, sizes=[(33, 47), (52, 41)], seed=7)
    data = json.loads(json_file.read_text())
    del data["images"][0]["height"]
    data["images"][1]["width"] = 0
    edit_coco(json_file, images=data["images"])
    src = load_coco(json_file, image_dir)
    assert src.heights.tolist() == [33, 52] and src.widths.tolist() == [47, 41]


def test_images_without_annotations_are_negatives(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=3, boxes_per_image=[0, 2, 0], seed=8)
    src = load_coco(json_file, image_dir)
    assert [len(src.record(i).boxes) for i in range(3)] == [0, 2, 0]
    assert src.stats["negative_images"] == 2
    edit_coco(json_file, annotations=[])
    assert load_coco(json_file, image_dir).boxes.shape == (0, 4)


@pytest.mark.parametrize("flag", ["0", "1", "false", "", 2, -1, 0.0, 1.0, None, [0], {"v": 1}])
def test_iscrowd_other_than_0_1_true_false_is_an_error(tmp_path, flag):
    # bool("0") is True: a string flag used to turn the box into crowd, dropped from training
    rng = np.random.default_rng()
    n = [int(k) for k in rng.integers(1, 4, 3)]
    json_file, image_dir = make_coco(tmp_path, n_images=3, boxes_per_image=n, seed=int(rng.integers(1e6)))
    data = json.loads(json_file.read_text())
    bad = int(rng.integers(len(data["annotations"])))
    data["annotations"][bad]["iscrowd"] = flag
    edit_coco(json_file, annotations=data["annotations"])
    aid = data["annotations"][bad]["id"]
    with pytest.raises(CocoFormatError, match=rf"{json_file.name}: annotation id {aid} has iscrowd "
                                              rf".*; allowed: 0, 1, true, false"):
        load_coco(json_file, image_dir)


def test_iscrowd_ints_and_json_booleans_are_read(tmp_path):
    rng = np.random.default_rng()
    json_file, image_dir = make_coco(tmp_path, n_images=4, boxes_per_image=[3, 2, 3, 0],
                                     seed=int(rng.integers(1e6)))
    data = json.loads(json_file.read_text())
    flags = [[0, 1, False, True][k] for k in rng.integers(0, 4, len(data["annotations"]))]
    for ann, flag in zip(data["annotations"], flags):
        ann["iscrowd"] = flag
    del data["annotations"][0]["iscrowd"]  # absent: not crowd
    flags[0] = 0
    edit_coco(json_file, annotations=data["annotations"])
    src = load_coco(json_file, image_dir)
    by_id = dict(zip(src.ann_ids.tolist(), src.iscrowd.tolist()))
    assert by_id == {a["id"]: bool(f) for a, f in zip(data["annotations"], flags)}
    assert src.stats["crowd"] == sum(bool(f) for f in flags)


def test_missing_annotation_file_names_the_spec_key(tmp_path):
    index = int(np.random.randint(0, 5))
    key = f"dataset.val_data_sources[{index}].json_file"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(key)}: annotation file .*nope.json does "
                                                r"not exist$"):
        load_coco(tmp_path / "nope.json", tmp_path, where=key)
    with pytest.raises(FileNotFoundError, match=r"^annotation file .*nope.json does not exist$"):
        load_coco(tmp_path / "nope.json", tmp_path)  # no key known: the path alone, as before
