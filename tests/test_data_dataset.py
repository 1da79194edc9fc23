"""Datasets (default and serialized), several sources, targets per contract, bad images."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.data.coco import CocoFormatError, load_coco
from codetr.data.dataset import CocoDetectionDataset
from codetr.data.images import ImageDecodeError
from codetr.data.labels import LabelMap
from codetr.data.serialized import SerializedStore
from codetr.data.transforms import build_transforms
from codetr.spec.schema import AugmentationConfig
from data_fixtures import CATEGORIES, edit_coco, make_coco

EVAL_AUG = AugmentationConfig(test_random_resize=48, random_resize_max_size=96)


def label_map(contiguous: bool) -> LabelMap:
    return LabelMap.from_categories(CATEGORIES, 3 if contiguous else 8, contiguous)


@pytest.mark.parametrize("contiguous", [True, False])
def test_default_and_serialized_give_identical_items(tmp_path, contiguous):
    src = load_coco(*make_coco(tmp_path, n_images=5, seed=21))
    lm = label_map(contiguous)
    transforms = build_transforms(EVAL_AUG, train=False)
    a = CocoDetectionDataset([src], lm, transforms, "default")
    b = CocoDetectionDataset([src], lm, transforms, "serialized")
    assert len(a) == len(b) == 5
    for i in range(5):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib)
        assert ta.keys() == tb.keys() == {"boxes", "labels", "image_id", "orig_size", "size"}
        for k in ta:
            assert torch.equal(torch.as_tensor(ta[k]), torch.as_tensor(tb[k])), k
        rec = a.record(i)
        # Labels map back to the original category ids of the annotation file.
        assert [lm.category_id(int(x)) for x in ta["labels"]] == rec.category_ids.tolist()


def test_target_contract_and_box_geometry(tmp_path):
    src = load_coco(*make_coco(tmp_path, n_images=3, seed=22))
    ds = CocoDetectionDataset([src], label_map(True), None, "serialized")
    for i in range(3):
        image, target = ds[i]
        rec = ds.record(i)
        assert image.dtype == torch.float32 and image.shape == (3, rec.height, rec.width)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["orig_size"].tolist() == target["size"].tolist() == [rec.height, rec.width]
        assert isinstance(target["image_id"], int) and target["image_id"] == rec.image_id
        h, w = rec.height, rec.width
        cx, cy, bw, bh = target["boxes"].unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
        assert torch.allclose(xyxy, torch.from_numpy(rec.boxes), atol=1e-3)


def test_sources_with_colliding_ids_stay_distinct(tmp_path):
    s1 = load_coco(*make_coco(tmp_path / "a", n_images=3, seed=23))
    s2 = load_coco(*make_coco(tmp_path / "b", n_images=2, seed=24))
    assert set(s1.image_ids.tolist()) & set(s2.image_ids.tolist())  # ids 1, 2 in both
    for kind in ("default", "serialized"):
        ds = CocoDetectionDataset([s1, s2], label_map(True), None, kind)
        assert len(ds) == 5
        assert [ds.source_of(i) for i in range(5)] == [0, 0, 0, 1, 1]
        assert [ds[i][1]["image_id"] for i in range(5)] == [1, 2, 3, 1, 2]
        assert ds.record(3).path != ds.record(0).path
        assert ds[3][0].shape[-2:] == (s2.heights[0], s2.widths[0])
        assert ds.json_files == [s1.json_file, s2.json_file]


def test_crowd_excluded_from_targets_negatives_kept(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=2, boxes_per_image=[3, 0], seed=25)
    data = json.loads(json_file.read_text())
    data["annotations"][0]["iscrowd"] = 1
    edit_coco(json_file, annotations=data["annotations"])
    ds = CocoDetectionDataset([load_coco(json_file, image_dir)], label_map(False), None, "serialized")
    assert len(ds[0][1]["boxes"]) == 2 and ds.record(0).iscrowd.sum() == 1
    _, negative = ds[1]
    assert negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,)


def test_unknown_category_for_label_map_names_annotation(tmp_path):
    cats = CATEGORIES + [{"id": 9, "name": "fish"}]
    json_file, image_dir = make_coco(tmp_path, n_images=2, boxes_per_image=[2, 1], categories=cats, seed=26)
    data = json.loads(json_file.read_text())
    for ann in data["annotations"]:
        ann["category_id"] = 9 if ann["id"] == 2 else 3
    edit_coco(json_file, annotations=data["annotations"])
    with pytest.raises(CocoFormatError, match=r"instances.json: annotation id 2 has category_id 9"):
        CocoDetectionDataset([load_coco(json_file, image_dir)], label_map(True), None)


def test_image_corrupted_after_loading_error_names_file(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=2, seed=27)
    ds = CocoDetectionDataset([load_coco(json_file, image_dir)], label_map(True), None)
    (image_dir / "img_27_1.png").write_bytes(b"\x89PNG not really")  # broken after the check
    ds[0]
    with pytest.raises(ImageDecodeError, match="img_27_1.png"):
        ds[1]


def test_exif_rotated_image_boxes_in_displayed_orientation(tmp_path):
    # Displayed image: 40 high, 60 wide, with a bright block at x 10..30, y 5..15.
    displayed = np.full((40, 60, 3), 20, dtype=np.uint8)
    displayed[5:15, 10:30] = 250
    raw = np.rot90(displayed, k=1)  # stored rotated; orientation 6 turns it back clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "images").mkdir()
    Image.fromarray(np.ascontiguousarray(raw)).save(tmp_path / "images" / "r.png", exif=exif)
    coco = {"images": [{"id": 1, "file_name": "r.png", "height": 40, "width": 60}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10]}],
            "categories": CATEGORIES}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    ds = CocoDetectionDataset([load_coco(tmp_path / "c.json", tmp_path / "images")], label_map(True), None)
    image, target = ds[0]
    assert target["orig_size"].tolist() == [40, 60]
    assert torch.allclose(target["boxes"], torch.tensor([[20 / 60, 10 / 40, 20 / 60, 10 / 40]]))
    assert bool((image[:, 5:15, 10:30] > 0.9).all()) and float(image[:, 20:, :].max()) < 0.2


def test_serialized_store_is_flat_arrays(tmp_path):
    s1 = load_coco(*make_coco(tmp_path / "a", n_images=4, seed=28))
    s2 = load_coco(*make_coco(tmp_path / "b", n_images=3, seed=29, boxes_per_image=[0, 0, 0]))
    store = SerializedStore([s1, s2])
    assert len(store) == 7 and store.ann_offsets.tolist()[-1] == len(s1.boxes)
    assert store.name_bytes.dtype == np.uint8 and store.nbytes() > 0
    for k, src in enumerate((s1, s2)):
        for i in range(len(src)):
            got, want = store.get(i + 4 * k), src.record(i, k)
            assert (got.file_name, got.image_id, got.source) == (want.file_name, want.image_id, k)
            np.testing.assert_array_equal(got.boxes, want.boxes)
            np.testing.assert_array_equal(got.ann_ids, want.ann_ids)
