"""Images are decoded up front: every bad file named, sizes reconciled with the JSON, a cache."""
import io
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from codetr.data import image_check
from codetr.data.coco import CocoFormatError, DataWarning, load_coco
from codetr.data.dataset import CocoDetectionDataset
from codetr.data.images import ImageDecodeError
from codetr.data.labels import LabelMap
from data_fixtures import CATEGORIES, make_coco


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODETR_CACHE_DIR", str(tmp_path / "cache"))


def _jpeg_bytes(seed: int, h: int = 48, w: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _break_three(image_dir, seed):
    """Truncated JPEG, zero bytes, random bytes, in place of images 0..2 (all named .png)."""
    names = [f"img_{seed}_{i}.png" for i in range(3)]
    (image_dir / names[0]).write_bytes(_jpeg_bytes(seed)[:300])
    (image_dir / names[1]).write_bytes(b"")
    (image_dir / names[2]).write_bytes(np.random.default_rng(seed).bytes(2000))
    return names


def test_every_corrupt_image_is_named_before_training(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=5, seed=3)
    names = _break_three(image_dir, 3)
    with pytest.raises(ImageDecodeError) as err:
        load_coco(json_file, image_dir)
    message = str(err.value)
    assert "3 of 5 images" in message and "skip_bad_images" in message
    for name in names:
        assert name in message
    assert "img_3_3.png" not in message and "img_3_4.png" not in message


def test_truncated_jpeg_is_caught_by_the_full_decode(tmp_path):
    path = tmp_path / "t.jpg"
    path.write_bytes(_jpeg_bytes(5, 256, 256)[:-400])  # header intact, entropy data cut
    with Image.open(path) as image:
        assert image.size == (256, 256)  # the header alone looks fine
    assert image_check.inspect_image(str(path)).error is not None
    good = tmp_path / "g.jpg"
    good.write_bytes(_jpeg_bytes(5, 256, 256))
    assert image_check.inspect_image(str(good)) == image_check.ImageInfo(256, 256, 1, None)


def test_skip_bad_images_drops_them_with_a_counted_warning(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=5, seed=4, boxes_per_image=[2, 1, 3, 2, 1])
    _break_three(image_dir, 4)
    with pytest.warns(DataWarning, match="skipped 3 of 5 images"):
        src = load_coco(json_file, image_dir, skip_bad_images=True)
    assert src.image_ids.tolist() == [4, 5] and src.stats["skipped_images"] == 3
    assert len(src.boxes) == 3 and src.ann_offsets.tolist() == [0, 2, 3]
    lm = LabelMap.from_categories(CATEGORIES, 3, True)
    ds = CocoDetectionDataset([src], lm, None)
    assert [ds[i][1]["image_id"] for i in range(len(ds))] == ds.image_ids == [4, 5]


def test_second_check_reads_the_cache_and_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    json_file, image_dir = make_coco(tmp_path, n_images=4, seed=6)
    load_coco(json_file, image_dir)
    decoded = []
    real = image_check.inspect_image
    monkeypatch.setattr(image_check, "inspect_image", lambda p: decoded.append(p) or real(p))
    load_coco(json_file, image_dir)
    assert decoded == []
    victim = image_dir / "img_6_2.png"
    victim.write_bytes(b"garbage")  # new size and mtime: the cached verdict no longer applies
    os.utime(victim, ns=(1, 1))
    with pytest.raises(ImageDecodeError, match="img_6_2.png"):
        load_coco(json_file, image_dir)
    assert decoded == [str(victim)]


def _exif_photo(path, stored_hw=(48, 64), orientation=6):
    rng = np.random.default_rng(9)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rng.integers(0, 256, (*stored_hw, 3), dtype=np.uint8)).save(path, exif=exif)


def _one_image_coco(tmp_path, height, width, bbox):
    coco = {"images": [{"id": 1, "file_name": "p.png", "height": height, "width": width}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox}],
            "categories": CATEGORIES}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    return tmp_path / "c.json"


def test_json_size_of_the_stored_frame_decodes_without_rotation(tmp_path):
    (tmp_path / "images").mkdir()
    _exif_photo(tmp_path / "images" / "p.png", stored_hw=(48, 64), orientation=6)  # displayed 64x48
    json_file = _one_image_coco(tmp_path, 48, 64, [40, 30, 20, 15])  # a box only the stored frame holds
    with pytest.warns(DataWarning, match="stored .unrotated. size"):
        src = load_coco(json_file, tmp_path / "images")
    assert src.exif.tolist() == [False]
    np.testing.assert_allclose(src.boxes, [[40, 30, 60, 45]])  # not clamped to a rotated frame
    image, target = CocoDetectionDataset([src], LabelMap.from_categories(CATEGORIES, 3, True), None)[0]
    assert tuple(image.shape[-2:]) == (48, 64) and target["orig_size"].tolist() == [48, 64]


def test_json_size_of_the_displayed_frame_applies_exif(tmp_path):
    (tmp_path / "images").mkdir()
    _exif_photo(tmp_path / "images" / "p.png", stored_hw=(48, 64), orientation=6)
    json_file = _one_image_coco(tmp_path, 64, 48, [5, 5, 20, 30])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        src = load_coco(json_file, tmp_path / "images")
    assert src.exif.tolist() == [True]
    image, _ = CocoDetectionDataset([src], LabelMap.from_categories(CATEGORIES, 3, True), None)[0]
    assert tuple(image.shape[-2:]) == (64, 48)


def test_json_size_matching_neither_frame_is_an_error_naming_the_image(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=3, seed=8, sizes=[(48, 64)] * 3)
    data = json.loads(json_file.read_text())
    data["images"][1]["height"], data["images"][1]["width"] = 4, 6
    json_file.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=r"img_8_1.png: the JSON says 6x4 \(w x h\), the file is 64x48"):
        load_coco(json_file, image_dir)
    with pytest.warns(DataWarning, match="1 with a size that contradicts"):
        assert load_coco(json_file, image_dir, skip_bad_images=True).image_ids.tolist() == [1, 3]


def test_coco_file_without_annotations_key_warns(tmp_path):
    json_file, image_dir = make_coco(tmp_path, n_images=2, seed=10)
    data = json.loads(json_file.read_text())
    del data["annotations"]
    json_file.write_text(json.dumps(data))
    with pytest.warns(DataWarning, match="no 'annotations' key: all 2 images"):
        assert len(load_coco(json_file, image_dir).boxes) == 0
