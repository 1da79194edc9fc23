"""`codetr evaluate` / `inference` with an official mmdet checkpoint file (the tiny reference).

The official file has no codetr spec: the run's spec builds the model and its label map (5
contiguous classes here, the tiny model's). The detections of the random-init tiny model mean
nothing; these tests check that the tasks run end to end on official files in both test paddings
and refuse a spec the weights do not fit.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from codetr.cli import main
from codetr.data.synthetic import generate
from codetr.spec.yaml_io import dump_yaml
from tests.zoo_fixtures import TINY_SPEC

SHAPES = ("circle", "square", "triangle", "cross", "ring")  # 5 classes, as the tiny model


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes5")
    generate(root, num_train=0, num_val=0, num_test=2, image_size=96, seed=0, classes=SHAPES)
    return root


def _spec_file(tmp_path: Path, shapes: Path, padding: str) -> Path:
    test = {"image_dir": str(shapes / "test" / "images"),
            "json_file": str(shapes / "test" / "annotations.json")}
    data = {"results_dir": str(tmp_path / "results"), "model": dict(TINY_SPEC["model"]),
            "dataset": {**TINY_SPEC["dataset"], "test_data_sources": test, "workers": 0,
                        "batch_size": 2,
                        "infer_data_sources": {"image_dir": test["image_dir"],
                                               "classmap": str(shapes / "classmap.txt")},
                        "augmentation": {"test_random_resize": 128, "random_resize_max_size": 128,
                                         "test_padding": padding}},
            "inference": {"conf_threshold": 0.0, "input_width": None, "input_height": None}}
    path = tmp_path / "spec.yaml"
    path.write_text(dump_yaml(data))
    return path


@pytest.mark.parametrize("padding", ["lsj", "mask"])
def test_evaluate_and_inference_run_on_an_official_file(mmdet_reference, shapes, tmp_path, padding,
                                                        capsys):
    spec = _spec_file(tmp_path, shapes, padding)
    ckpt = mmdet_reference / "tiny_mmengine_checkpoint.pth"
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={ckpt}"]) == 0
    printed = capsys.readouterr().out
    assert "official Co-DINO checkpoint (mmdet 3.x)" in printed and "every model tensor loaded" in printed
    metrics = json.loads((tmp_path / "results" / "evaluate" / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 5
    assert main(["inference", "-e", str(spec), f"inference.checkpoint={ckpt}"]) == 0
    labels = sorted((tmp_path / "results" / "inference" / "labels").rglob("*.txt"))
    assert len(labels) == 2 and all(p.read_text().strip() for p in labels)
    names = {line.split()[0] for p in labels for line in p.read_text().splitlines()}
    assert names <= set(SHAPES)


def test_a_spec_the_weights_do_not_fit_is_refused(mmdet_reference, shapes, tmp_path, capsys):
    spec = _spec_file(tmp_path, shapes, "mask")
    ckpt = mmdet_reference / "tiny_published_checkpoint.pth"
    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={ckpt}", "model.dec_layers=2"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model of this spec" in err and "unexpected" in err


def test_import_mmdet_writes_a_codetr_checkpoint_once(mmdet_reference, shapes, tmp_path, capsys):
    import torch

    from codetr.tasks.checkpoint import restore_detector
    from tests.test_zoo_tiny import _run

    spec = _spec_file(tmp_path, shapes, "mask")
    source = mmdet_reference / "tiny_mmengine_checkpoint.pth"
    assert main(["import_mmdet", "-e", str(spec), f"import_mmdet.checkpoint={source}"]) == 0
    out = tmp_path / "results" / "import_mmdet" / "codetr_model.pth"
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["imported_from"]["meta"]["epoch"] == 12
    assert ckpt["imported_from"]["flavour"] == "mmdet 3.x"
    # The converted file needs no spec: it carries its own, and the same numbers come out.
    model, label_map, _, _ = restore_detector(out)
    assert label_map.names == SHAPES
    inputs = torch.load(mmdet_reference / "tiny_inputs.pth", weights_only=True)
    ref = torch.load(mmdet_reference / "tiny_outputs.pth", weights_only=True)["nolsj"]
    outputs, _ = _run(model, inputs, lsj=False)
    torch.testing.assert_close(outputs["pred_logits"], ref["pred_logits"], atol=1e-4, rtol=0)
    # A file that is not official is refused with a spec error (exit 2).
    assert main(["import_mmdet", "-e", str(spec), f"import_mmdet.checkpoint={out}"]) == 2
    assert "not an official" in capsys.readouterr().err
