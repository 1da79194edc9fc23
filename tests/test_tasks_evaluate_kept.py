"""`codetr evaluate` scores the images the test set keeps (`dataset.skip_bad_images`)."""
import json
import shutil

import pytest

from codetr.data.synthetic import generate
from codetr.spec import spec_from_dict
from codetr.tasks import evaluate, train
from tests.test_tasks_e2e import tiny_spec_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=2, num_val=2, num_test=2, image_size=64, seed=1, max_objects=3)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A one-epoch tiny run: evaluate needs a checkpoint; its detections are replaced below."""
    results = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(results)
        spec = spec_from_dict(tiny_spec_dict(data, results, num_epochs=1))
        assert train.run(spec) == 0
    return spec, results


def test_evaluate_scores_only_the_images_kept(trained, data, tmp_path, monkeypatch):
    """With `skip_bad_images`, a dropped image's boxes are not counted as misses: perfect
    detections of the kept images score AP 1 (below 1 if the dropped image's box counted)."""
    spec, results = trained
    gt = json.loads((data / "test" / "annotations.json").read_text())
    bad = {"id": 99, "file_name": "broken.jpg", "width": 64, "height": 64}
    shutil.copytree(data / "test" / "images", tmp_path / "images")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a JPEG")
    gt["images"].append(bad)
    gt["annotations"].append({"id": 999, "image_id": 99, "category_id": 3, "bbox": [1, 1, 20, 20],
                              "area": 400, "iscrowd": 0})
    (tmp_path / "annotations.json").write_text(json.dumps(gt))
    d = tiny_spec_dict(data, results)
    d["results_dir"] = str(tmp_path / "results")
    d["dataset"]["test_data_sources"] = {"image_dir": str(tmp_path / "images"),
                                         "json_file": str(tmp_path / "annotations.json")}
    d["dataset"]["skip_bad_images"] = True
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if a["image_id"] != 99]
    monkeypatch.setattr(evaluate, "predict_coco", lambda *args: perfect)
    with pytest.warns(UserWarning, match="skipped 1 of"):
        assert evaluate.run(spec_from_dict(d)) == 0
    metrics = json.loads((tmp_path / "results" / "evaluate" / "metrics.json").read_text())
    assert metrics["AP50"] == pytest.approx(1.0)
