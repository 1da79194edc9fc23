"""The adversarial catalogue: every input a user can fix gets exit 2, one clean message, no
traceback; the message names the file, key or value (and what is allowed)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codetr.cli import main
from codetr.data.synthetic import generate
from codetr.errors import UserError

CODETR = [sys.executable, "-m", "codetr.cli"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=2, num_val=0, num_test=2, image_size=64, seed=3, max_objects=2)
    return root


def run_main(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("override, fragment", [
    ("model.dropout_ratio=.nan", "model.dropout_ratio=nan: expected a finite number"),
    ("train.optim.lr_backbone=.inf", "train.optim.lr_backbone=inf: expected a finite number"),
    ("train.clip_grad_norm=-.inf", "expected a finite number"),
    ("train.optim.weight_decay=.NaN", "expected a finite number"),
    ("evaluate.conf_threshold=1.5", "evaluate.conf_threshold=1.5 is out of range: must be <= 1.0"),
    ("inference.conf_threshold=.nan", "inference.conf_threshold=nan: expected a finite number"),
    ("model.return_interm_indices=[1,2", "override model.return_interm_indices: not valid YAML"),
    ("results_dir=", "results_dir is empty"),
    ("model.dn_label_noise_ratio=2.0", "must be <= 1.0"),
])
def test_bad_overrides(override, fragment, capsys):
    code, err = run_main(["spec", override], capsys)
    assert code == 2 and fragment in err, err
    assert "Traceback" not in err


def test_hydra_delete_resets_to_the_default(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("train:\n  seed: 7\n  num_epochs: 3\n")
    assert main(["spec", "-e", str(spec), "~train.seed"]) == 0
    out = capsys.readouterr().out
    assert "seed: 1234" in out and "num_epochs: 3" in out


def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path, capsys):
    spec = tmp_path / "dup.yaml"
    spec.write_text("train:\n  optim:\n    lr: 0.1\n    lr: 0.2\n")
    code, err = run_main(["spec", "-e", str(spec)], capsys)
    assert code == 2 and "dup.yaml" in err and "duplicate key 'lr' on lines 3 and 4" in err, err


def test_directory_and_non_utf8_specs_name_the_file(tmp_path, capsys):
    code, err = run_main(["spec", "-e", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} is a directory" in err, err
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("train:\n  seed: 3  # caf\xe9\n".encode("latin-1"))
    code, err = run_main(["spec", "-e", str(latin)], capsys)
    assert code == 2 and "latin1.yaml: not UTF-8" in err, err


def _spec(tmp_path, data, **sections) -> str:
    spec = {"results_dir": str(tmp_path / "results"),
            "model": {"backbone": "resnet_18", "num_feature_levels": 1, "return_interm_indices": [3],
                      "hidden_dim": 16, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
                      "num_queries": 5, "dim_feedforward": 16, "num_co_heads": 0},
            "dataset": {"train_data_sources": [{"image_dir": str(data / "train" / "images"),
                                                "json_file": str(data / "train" / "annotations.json")}],
                        "num_classes": 21, "workers": 0, "batch_size": 1},
            "train": {"num_epochs": 1, "activation_checkpoint": False}}
    for key, value in sections.items():
        spec.setdefault(key, {}).update(value) if isinstance(value, dict) else spec.update({key: value})
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    return str(path)


def test_missing_annotation_file(tmp_path, data, capsys):
    spec = _spec(tmp_path, data)
    code, err = run_main(["train", "-e", spec, "dataset.train_data_sources=[{image_dir: /x, json_file: /nope.json}]"], capsys)
    assert code == 2 and "annotation file /nope.json does not exist" in err, err


def test_unwritable_results_dir(tmp_path, data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_main(["train", "-e", _spec(tmp_path, data), f"results_dir={blocker}/sub"], capsys)
    assert code == 2 and "train results directory" in err and "not writable" in err, err


def test_bad_freeze_prefix(tmp_path, data, capsys):
    code, err = run_main(["train", "-e", _spec(tmp_path, data), "train.freeze=[no_such_module]"], capsys)
    assert code == 2 and "train.freeze: 'no_such_module' matches no parameter" in err, err


def test_training_set_without_boxes_is_refused(tmp_path, data, capsys):
    coco = json.loads((data / "train" / "annotations.json").read_text())
    coco["annotations"] = []
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(coco))
    code, err = run_main(["train", "-e", _spec(tmp_path, data), "dataset.train_data_sources="
                          f"[{{image_dir: {data / 'train' / 'images'}, json_file: {empty}}}]"], capsys)
    assert code == 2 and "the training set has no boxes" in err and "empty.json" in err, err


def test_corrupt_train_image_exits_2_naming_it(tmp_path, data, capsys):
    import shutil
    images = tmp_path / "images"
    shutil.copytree(data / "train" / "images", images)
    victim = sorted(images.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    code, err = run_main(["train", "-e", _spec(tmp_path, data), "dataset.train_data_sources="
                          f"[{{image_dir: {images}, json_file: {data / 'train' / 'annotations.json'}}}]"], capsys)
    assert code == 2 and victim.name in err and "cannot be decoded" in err, err


def test_duplicate_category_names_are_an_error(tmp_path, data, capsys):
    coco = json.loads((data / "train" / "annotations.json").read_text())
    coco["categories"][1]["name"] = coco["categories"][0]["name"] + "  "
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(coco))
    code, err = run_main(["train", "-e", _spec(tmp_path, data), "dataset.train_data_sources="
                          f"[{{image_dir: {data / 'train' / 'images'}, json_file: {dup}}}]"], capsys)
    assert code == 2 and "are both named" in err, err


def test_oversized_image_names_the_file(tmp_path, monkeypatch):
    from codetr.data.images import ImageDecodeError, load_rgb
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2 x 100: a "decompression bomb"
    with pytest.raises(ImageDecodeError, match="big.png"):
        load_rgb(path)


def test_bad_colour_and_classmap_are_user_errors(tmp_path):
    from codetr.data.classmap import read_classmap
    from codetr.tasks.draw import class_colors
    with pytest.raises(UserError, match="'blurple' is not a colour"):
        class_colors(["cat"], {"cat": "blurple"})
    bad = tmp_path / "classmap.txt"
    bad.write_text("cat\n\ndog\n")
    with pytest.raises(UserError, match="classmap.txt:2: empty line"):
        read_classmap(bad)


def test_user_errors_in_a_subprocess_have_no_traceback(tmp_path):
    out = subprocess.run(CODETR + ["evaluate", "-e", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "is a directory" in out.stderr


def test_category_names_round_trip_through_the_classmap(tmp_path):
    from codetr.data.classmap import read_classmap, write_classmap
    from codetr.data.coco import load_coco
    from data_fixtures import make_coco
    json_file, image_dir = make_coco(tmp_path, n_images=2, seed=1,
                                     categories=[{"id": 1, "name": "  traffic light "}, {"id": 2, "name": "cup"}])
    names = [c["name"] for c in load_coco(json_file, image_dir).categories]
    assert names == ["traffic light", "cup"]
    write_classmap(tmp_path / "classmap.txt", names)
    assert read_classmap(tmp_path / "classmap.txt") == names
    with pytest.raises(UserError, match="without leading or trailing white space"):
        write_classmap(tmp_path / "x.txt", [" cup"])


def test_inference_listing_follows_symlinked_folders_and_counts_what_it_skips(tmp_path):
    from codetr.data.images import list_images
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "in_link.jpg")
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.jpg")
    Image.new("RGB", (8, 8)).save(root / "..jpg", format="JPEG")
    (root / "linked").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(root, target_is_directory=True)  # a link back up: must end
    with pytest.warns(UserWarning) as record:
        found = list_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == ["a.jpg", "linked/in_link.jpg"]
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 1 hidden entries" in messages and "..jpg" in messages
    assert "reached twice through symbolic links" in messages


def test_disk_full_names_the_file_and_leaves_no_partial_output(tmp_path, monkeypatch):
    import errno
    import os as _os
    import shutil

    from codetr.errors import DiskFullError
    from codetr.fileio import atomic_write_bytes
    target = tmp_path / "train" / "last.pth"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 100))
    with pytest.raises(DiskFullError, match=r"not enough space to write .*last.pth: it needs"):
        atomic_write_bytes(target, b"x" * 4096)
    monkeypatch.undo()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(_os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing .*last.pth"):
        atomic_write_bytes(target, b"x" * 4096)
    assert not target.exists() and not list(target.parent.iterdir())


def test_a_list_as_a_yaml_key_is_a_clean_error(tmp_path, capsys):
    spec = tmp_path / "odd.yaml"
    spec.write_text("[a]: 1\n")
    code, err = run_main(["spec", "-e", str(spec)], capsys)
    assert code == 2 and "a mapping key must be a plain name" in err, err


def test_a_file_that_is_not_onnx_is_a_user_error(tmp_path):
    from codetr.export.onnx_runtime import OnnxDetector
    bad = tmp_path / "model.onnx"
    bad.write_bytes(np.random.default_rng(3).bytes(512))
    with pytest.raises(UserError, match="model.onnx is not an ONNX model onnxruntime can load"):
        OnnxDetector(bad)
