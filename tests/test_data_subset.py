"""Category subsets and by-image splits of a COCO dict (`codetr.data.subset`), and `prepare` with them."""
import json
from collections import Counter

import numpy as np
import pytest

from codetr.data.subset import SubsetError, select_categories, split_by_image
from pipeline.prepare import PrepareError, run


def _fresh_rng() -> np.random.Generator:
    """A generator seeded from numpy's global one, which tests/conftest.py seeds per test (replayable)."""
    return np.random.default_rng(np.random.randint(2**31))


def _random_coco(rng: np.random.Generator, num_images: int = 40) -> dict:
    """A COCO dict with 3 categories (ids 5, 9, 12), 0..4 boxes per image, shuffled image ids."""
    ids = rng.permutation(np.arange(100, 100 + num_images)).tolist()
    images = [{"id": int(i), "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in ids]
    annotations, ann_id = [], 1
    for im in images:
        for _ in range(int(rng.integers(0, 5))):
            annotations.append({"id": ann_id, "image_id": im["id"], "iscrowd": 0, "area": 4.0,
                                "category_id": int(rng.choice([5, 9, 12])), "bbox": [1, 1, 2, 2]})
            ann_id += 1
    cats = [{"id": 5, "name": "cat"}, {"id": 9, "name": " dog"}, {"id": 12, "name": "cow"}]
    return {"info": {"v": 1}, "images": images, "annotations": annotations, "categories": cats}


def test_select_categories_keeps_ids_and_drops_empty_images():
    rng = _fresh_rng()
    coco = _random_coco(rng)
    before = json.dumps(coco)
    sub = select_categories(coco, ["dog", "cow"])
    assert json.dumps(coco) == before  # the input is not modified
    assert [c["id"] for c in sub["categories"]] == [9, 12]
    assert {a["category_id"] for a in sub["annotations"]} <= {9, 12}
    expected = [a for a in coco["annotations"] if a["category_id"] in (9, 12)]
    assert sub["annotations"] == expected
    assert {im["id"] for im in sub["images"]} == {a["image_id"] for a in expected}
    assert sub["info"] == coco["info"]
    kept = select_categories(coco, ["cat"], drop_empty_images=False)
    assert kept["images"] == coco["images"]


@pytest.mark.parametrize("names, match", [([], "at least one"), (["cat", "cat"], "repeated"),
                                          (["horse"], r"unknown category name\(s\) \['horse'\]")])
def test_select_categories_errors_name_the_key(names, match):
    coco = _random_coco(_fresh_rng())
    with pytest.raises(SubsetError, match=match) as info:
        select_categories(coco, names, where="prepare.coco.categories")
    assert "prepare.coco.categories" in str(info.value)


def test_split_by_image_partitions_deterministically():
    rng = _fresh_rng()
    coco = _random_coco(rng, num_images=int(rng.integers(30, 60)))
    seed = int(rng.integers(0, 1000))
    parts = split_by_image(coco, {"val": 0.25, "test": 0.1}, seed=seed)
    again = split_by_image(coco, {"test": 0.1, "val": 0.25}, seed=seed)
    assert parts == again  # the seed alone fixes the split, not the key order
    n = len(coco["images"])
    sizes = {k: len(v["images"]) for k, v in parts.items()}
    assert sizes["val"] == round(0.25 * n) and sizes["test"] == max(1, round(0.1 * n))
    assert sum(sizes.values()) == n
    owner = {im["id"]: k for k, v in parts.items() for im in v["images"]}
    assert len(owner) == n
    for name, part in parts.items():  # every box goes with its image
        assert all(owner[a["image_id"]] == name for a in part["annotations"])
        assert part["categories"] == coco["categories"]
    assert Counter(a["id"] for p in parts.values() for a in p["annotations"]) == \
        Counter(a["id"] for a in coco["annotations"])
    other = split_by_image(coco, {"val": 0.25, "test": 0.1}, seed=seed + 1)
    assert other["val"]["images"] != parts["val"]["images"]


def test_split_by_image_zero_fraction_and_errors():
    coco = _random_coco(_fresh_rng(), num_images=5)
    assert set(split_by_image(coco, {"val": 0.2, "test": 0.0})) == {"train", "val"}
    for fractions, match in [({"train": 0.5}, "unknown held-out split"),
                             ({"val": 1.0}, r"in \[0, 1\)"), ({"val": "x"}, "must be a number"),
                             ({"val": 0.6, "test": 0.5}, "leave no training"),
                             ({"val": 0.55, "test": 0.4}, "too few")]:
        with pytest.raises(SubsetError, match=match):
            split_by_image(coco, fractions, where="prepare.coco.split")


def test_prepare_person_split_of_coco128(tmp_path, coco128):
    params = {"source": "coco", "coco": {
        "images": "symlink", "categories": ["person"], "split": {"val": 0.25, "seed": 3},
        "train": {"json_file": str(coco128 / "annotations" / "instances.json"),
                  "image_dir": str(coco128 / "images")}}}
    stats = run(params, tmp_path / "data")
    # coco128 has 61 images with a person and 254 person boxes
    assert stats["splits"]["train"]["images"] + stats["splits"]["val"]["images"] == 61
    assert stats["splits"]["val"]["images"] == round(0.25 * 61)
    assert sum(s["boxes"] for s in stats["splits"].values()) == 254
    assert [c["name"] for c in stats["categories"]] == ["person"]
    assert (tmp_path / "data" / "classmap.txt").read_text().split() == ["person"]
    val = json.loads((tmp_path / "data" / "val" / "annotations.json").read_text())
    for im in val["images"]:
        assert (tmp_path / "data" / "val" / "images" / im["file_name"]).exists()


def test_prepare_subset_errors(tmp_path, coco128):
    train = {"json_file": str(coco128 / "annotations" / "instances.json"),
             "image_dir": str(coco128 / "images")}
    cases = [({"train": train, "val": train, "split": {"val": 0.2}}, "remove prepare.coco.val"),
             ({"train": train, "split": [0.2]}, "must be a mapping"),
             ({"train": train, "categories": ["persn"]}, r"prepare.coco.categories: unknown"),
             ({"train": train, "split": {"valid": 0.2}}, "unknown held-out split 'valid'")]
    for coco, match in cases:
        with pytest.raises(PrepareError, match=match):
            run({"source": "coco", "coco": coco}, tmp_path / "data")
        assert not (tmp_path / "data").exists()
