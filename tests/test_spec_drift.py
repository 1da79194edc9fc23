"""evaluate / inference / export rebuild the model from the checkpoint: the run's `model.*`,
`dataset.num_classes` / `contiguous_labels` that differ are named in one notice, another input
normalisation is refused, and `experiment_spec.yaml` records the spec really used
(`codetr.tasks.spec_drift`)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from codetr.cli import main
from codetr.data.synthetic import generate
from codetr.spec import load_spec
from codetr.spec.yaml_io import dump_yaml
from tests.export_fixtures import tiny_model_dict, write_checkpoint
from tests.zoo_fixtures import TINY_SPEC

OTHER_BACKBONES = ("resnet_18", "resnet_50", "efficientnet_lite0", "swin_tiny_224_1k")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic shapes (ids 3, 7, 11, 20: 21 logits, as export_fixtures' label map) and a tiny
    codetr checkpoint of `tiny_model_dict` with a random query count."""
    root = tmp_path_factory.mktemp("drift")
    generate(root / "data", num_train=0, num_val=0, num_test=2, image_size=64, seed=5, max_objects=2)
    queries = random.randint(8, 24)
    checkpoint = root / "ck.pth"
    _, trained = write_checkpoint(checkpoint, tiny_model_dict(num_queries=queries),
                                  seed=random.randint(0, 999))
    return root, checkpoint, trained


def _spec_file(root: Path, tmp_path: Path, model: dict, dataset: dict | None = None) -> Path:
    data = root / "data"
    test = {"image_dir": str(data / "test" / "images"), "json_file": str(data / "test" / "annotations.json")}
    spec = {"results_dir": str(tmp_path / "results"), "model": model,
            "dataset": {"test_data_sources": test, "workers": 0, "batch_size": 2,
                        "infer_data_sources": {"image_dir": test["image_dir"]},
                        "num_classes": 21, "contiguous_labels": False,
                        "augmentation": {"input_mean": [0.5, 0.5, 0.5], "input_std": [0.5, 0.5, 0.5],
                                         "test_random_resize": 64, "random_resize_max_size": 64},
                        **(dataset or {})},
            "inference": {"conf_threshold": 0.0, "input_width": 64, "input_height": 64}}
    path = tmp_path / "spec.yaml"
    path.write_text(dump_yaml(spec))
    return path


@pytest.mark.parametrize("task", ["evaluate", "inference", "export"])
def test_differing_keys_are_named_and_the_used_spec_is_saved(setup, tmp_path, capsys, task):
    root, checkpoint, trained = setup
    queries = trained.model.num_queries + random.randint(1, 50)
    backbone = random.choice(OTHER_BACKBONES)
    select = random.randint(5, 40)
    model = tiny_model_dict(num_queries=queries, backbone=backbone, num_select=select)
    spec = _spec_file(root, tmp_path, model, {"num_classes": 30, "contiguous_labels": False})
    # export: its parity check is not the point here, and random tiny weights can miss 1e-3
    extra = ["export.verify=false"] if task == "export" else []
    assert main([task, "-e", str(spec), f"{task}.checkpoint={checkpoint}", *extra]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "the checkpoint's is used" in line]
    assert sorted(line.split(":")[0].strip() for line in lines) == [
        "dataset.num_classes", "model.backbone", "model.num_queries"], out
    assert f"model.num_queries: {queries} in the spec, {trained.model.num_queries} in the checkpoint" in out
    assert f"model.backbone: {backbone} in the spec, efficientvit_b0 in the checkpoint" in out
    assert "dataset.num_classes: 30 in the spec, 21 in the checkpoint" in out
    assert str(checkpoint) in out and "num_select" not in out  # post-processing is the run's
    saved = load_spec(tmp_path / "results" / task / "experiment_spec.yaml")
    assert saved.model.num_queries == trained.model.num_queries
    assert saved.model.backbone == trained.model.backbone == "efficientvit_b0"
    assert saved.model.num_select == select and saved.dataset.num_classes == 21


def test_the_same_model_keys_give_no_notice(setup, tmp_path, capsys):
    root, checkpoint, trained = setup
    select = random.randint(5, 40)  # a post-processing key may differ: the run's is used
    model = tiny_model_dict(num_queries=trained.model.num_queries, num_select=select)
    spec = _spec_file(root, tmp_path, model)
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={checkpoint}"]) == 0
    assert "the checkpoint's is used" not in capsys.readouterr().out
    assert load_spec(tmp_path / "results" / "evaluate" / "experiment_spec.yaml").model.num_select == select


@pytest.mark.parametrize("task, key", [("evaluate", "input_mean"), ("inference", "input_std")])
def test_another_normalisation_is_refused(setup, tmp_path, capsys, task, key):
    root, checkpoint, trained = setup
    value = [round(random.uniform(0.1, 0.9), 3) for _ in range(3)]
    spec = _spec_file(root, tmp_path, tiny_model_dict(num_queries=trained.model.num_queries))
    code = main([task, "-e", str(spec), f"{task}.checkpoint={checkpoint}",
                 f"dataset.augmentation.{key}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and f"dataset.augmentation.{key}={value} differs from the [0.5, 0.5, 0.5]" in err, err
    assert str(checkpoint) in err and "Traceback" not in err
    assert not (tmp_path / "results" / task / "experiment_spec.yaml").exists()


def test_one_value_normalisation_equals_three(setup, tmp_path, capsys):
    """`[0.5]` normalises every channel as `[0.5, 0.5, 0.5]` does: not a mismatch."""
    root, checkpoint, trained = setup
    spec = _spec_file(root, tmp_path, tiny_model_dict(num_queries=trained.model.num_queries),
                      {"augmentation": {"input_mean": [0.5], "input_std": [0.5, 0.5, 0.5],
                                        "test_random_resize": 64, "random_resize_max_size": 64}})
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={checkpoint}"]) == 0
    assert "the checkpoint's is used" not in capsys.readouterr().out


def test_an_official_checkpoint_builds_from_the_spec_without_notice(mmdet_reference, tmp_path, capsys):
    """No stored spec: the run's spec is the model's, so nothing differs and it is saved as given."""
    generate(tmp_path / "data", num_train=0, num_val=0, num_test=2, image_size=96, seed=2,
             classes=("circle", "square", "triangle", "cross", "ring"))
    test = {"image_dir": str(tmp_path / "data" / "test" / "images"),
            "json_file": str(tmp_path / "data" / "test" / "annotations.json")}
    select = random.randint(5, 40)
    spec = tmp_path / "spec.yaml"
    spec.write_text(dump_yaml({"results_dir": str(tmp_path / "results"),
                               "model": {**TINY_SPEC["model"], "num_select": select},
                               "dataset": {**TINY_SPEC["dataset"], "test_data_sources": test,
                                           "workers": 0, "batch_size": 2,
                                           "augmentation": {"test_random_resize": 128,
                                                            "random_resize_max_size": 128}}}))
    ckpt = mmdet_reference / "tiny_mmengine_checkpoint.pth"
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={ckpt}"]) == 0
    assert "the checkpoint's is used" not in capsys.readouterr().out
    saved = load_spec(tmp_path / "results" / "evaluate" / "experiment_spec.yaml")
    assert saved.model == load_spec(spec).model and saved.model.num_select == select
