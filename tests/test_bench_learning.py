"""bench/learning.py on a real-style COCO file: the split, the spec, a short run, the tables.

A tiny synthetic COCO file (12 images of 64 px written by `generate_split`) stands in for a user's
data: it is read through `--data` exactly as a real one (category selection, by-image split),
and one short in-process run (a 2 s CPU-time budget, 1 thread, no pretrained trunk) checks that
the marks, the diagnostics and the equal-steps view come out. Whole file: ~10 s on one core.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from codetr.data.subset import split_by_image  # noqa: E402
from codetr.data.synthetic import generate_split  # noqa: E402
from learning import main, parse_args  # noqa: E402
from learning_data import bench_spec, real_data  # noqa: E402
from learning_diag import loss_group  # noqa: E402
from learning_report import equal_steps, format_tables, interpolate  # noqa: E402
from learning_run import run_model  # noqa: E402


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    generate_split(tmp_path / "src", "train", 12, image_size=64, seed=3, max_objects=3,
                   empty_prob=0.0)
    return tmp_path / "src" / "train" / "annotations.json", tmp_path / "src" / "train" / "images"


def test_real_split_is_subset_split(tiny_coco, tmp_path):
    data, images = tiny_coco
    split = real_data(data, images, tmp_path / "out", categories=["circle", "square"],
                      val_fraction=0.25, split_seed=5)
    train, val = json.loads(split.train_json.read_text()), json.loads(split.val_json.read_text())
    coco = json.loads(data.read_text())
    keep = {c["id"] for c in coco["categories"] if c["name"] in ("circle", "square")}
    assert split.num_classes == 2
    assert {a["category_id"] for a in train["annotations"] + val["annotations"]} <= keep
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    # the same images as the library's split of the same selection and seed (the pipeline's)
    from codetr.data.subset import select_categories
    ref = split_by_image(select_categories(coco, ["circle", "square"]), {"val": 0.25}, seed=5)
    assert [i["id"] for i in val["images"]] == [i["id"] for i in ref["val"]["images"]]
    assert split.summary["val"]["images"] == len(ref["val"]["images"])


def test_short_run_with_diagnostics(tiny_coco, tmp_path):
    data, images = tiny_coco
    split = real_data(data, images, tmp_path / "out", val_fraction=0.25, split_seed=0)
    spec = bench_spec(REPO / "params.yaml", split, None, "ours", ["model.pretrained_backbone_path=null"],
                      image_size=64, seed=1)
    aug = spec.dataset.augmentation
    assert (aug.scales, aug.random_resize_max_size, aug.test_random_resize) == ([64], 64, 64)
    assert spec.train.seed == 1 and spec.dataset.num_classes == 4
    threads = torch.get_num_threads()
    try:
        res = run_model("ours", spec, budget=2.0, eval_every=1.0, threads=1, workers=0,
                        schedule=False, clock="cpu", diagnostics=True)
    finally:
        torch.set_num_threads(threads)
    assert res["clock"] == "cpu" and res["steps"] >= 1
    assert res["marks"][-1]["mark_s"] == 2.0 and res["train_s"] >= 2.0
    diag = res["marks"][-1]["diag"]
    assert set(diag["groups"]) == {"one_to_one", "interm", "dn", "pos", "co"}
    assert diag["counts"]["gt_per_image"] > 0
    assert diag["counts"]["positives_per_image_co0"] > 0
    enc = res["marks"][-1]["encoder"]
    assert 0.0 <= enc["recall50"] <= 1.0 and 0.0 <= enc["AP50"] <= 1.0
    table = format_tables({"ours": res})
    assert "equal steps" in table and "(cpu clock)" in table


def test_loss_groups():
    assert loss_group("loss_ce") == loss_group("loss_giou_1") == "one_to_one"
    assert loss_group("loss_bbox_interm") == "interm"
    assert loss_group("loss_ce_dn") == loss_group("loss_giou_dn_0") == "dn"
    assert loss_group("loss_ce_pos1_2") == "pos"
    assert loss_group("loss_centerness_co0") == loss_group("loss_rpn_cls_co0") == "co"


def test_equal_steps_interpolates_at_the_slowest_models_marks():
    marks = lambda pts: [{"steps": s, "AP": ap, "AP50": ap} for s, ap in pts]  # noqa: E731
    results = {"slow": {"marks": marks([(10, 0.1), (20, 0.3)])},
               "fast": {"marks": marks([(15, 0.2), (30, 0.5), (45, 0.6)])}}
    view = equal_steps(results)
    assert view["reference"] == "slow"
    assert view["rows"][0]["fast"] is None  # 10 steps: before fast's first mark, not extrapolated
    assert view["rows"][1]["fast"]["AP"] == pytest.approx(0.2 + 0.3 * 5 / 15, abs=1e-4)
    assert view["rows"][1]["slow"]["AP"] == pytest.approx(0.3)
    assert interpolate(results["fast"]["marks"], 50, "AP") is None


def test_cli_errors(tiny_coco, tmp_path, capsys):
    data, images = tiny_coco
    with pytest.raises(SystemExit) as err:
        parse_args(["--data", str(data)])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main(["--data", str(data), "--images", str(images), "--categories", "hexagon",
              "--out", str(tmp_path / "o" / "x.json")])
    assert err.value.code == 2
    assert "unknown category name(s) ['hexagon']" in capsys.readouterr().err
    assert parse_args(["--data", str(data), "--images", str(images)]).schedule is False
    assert parse_args([]).schedule is True
