"""Stage `prepare`: synthetic and user COCO sources, contiguous ids, stats, failure hygiene."""
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from codetr.data.coco import CocoFormatError, load_coco
from codetr.data.synthetic import generate
from codetr.spec import SpecError
from pipeline import prepare
from pipeline.prepare import PrepareError, check_spec, run

SYN = {"num_train": 20, "num_val": 6, "num_test": 4, "image_size": 64, "seed": 3,
       "classes": ["circle", "square", "triangle"]}


def _coco(path: Path) -> dict:
    return json.loads(path.read_text())


def test_synthetic_layout_and_stats(tmp_path):
    stats = run({"source": "synthetic", "synthetic": SYN}, tmp_path / "data")
    out = tmp_path / "data"
    assert sorted(p.name for p in out.iterdir()) == [
        "classmap.txt", "stats.json", "test", "train", "val"]
    assert json.loads((out / "stats.json").read_text()) == stats
    assert (out / "classmap.txt").read_text().split() == ["circle", "square", "triangle"]
    for split, n in (("train", 20), ("val", 6), ("test", 4)):
        coco = _coco(out / split / "annotations.json")
        s = stats["splits"][split]
        assert s["images"] == n == len(list((out / split / "images").glob("*.jpg")))
        assert s["boxes"] == len(coco["annotations"])
        names = {c["id"]: c["name"] for c in coco["categories"]}
        assert list(s["boxes_per_class"]) == ["circle", "square", "triangle"]
        counted = Counter(names[a["category_id"]] for a in coco["annotations"])
        assert Counter(s["boxes_per_class"]) == counted
        assert s["empty_images"] == n - len({a["image_id"] for a in coco["annotations"]})
    assert [c["id"] for c in stats["categories"]] == [3, 7, 11]
    assert not list(tmp_path.glob(".data.tmp-*"))


def test_contiguous_ids_rewrite_every_split(tmp_path):
    run({"source": "synthetic", "synthetic": SYN}, tmp_path / "orig")
    stats = run({"source": "synthetic", "contiguous_ids": True, "synthetic": SYN}, tmp_path / "data")
    assert [c["id"] for c in stats["categories"]] == [1, 2, 3]
    for split in ("train", "val", "test"):
        old = _coco(tmp_path / "orig" / split / "annotations.json")
        new = _coco(tmp_path / "data" / split / "annotations.json")
        mapping = {3: 1, 7: 2, 11: 3}
        assert [mapping[a["category_id"]] for a in old["annotations"]] == \
            [a["category_id"] for a in new["annotations"]]
        assert [a["bbox"] for a in old["annotations"]] == [a["bbox"] for a in new["annotations"]]
    check_spec(stats, {"num_classes": 3, "contiguous_labels": True})
    with pytest.raises(SpecError, match="num_classes=3"):
        check_spec(stats, {"num_classes": 4, "contiguous_labels": True})


def test_contiguous_flags_must_be_real_booleans(tmp_path):
    """`dvc exp run -S prepare.contiguous_ids=no` writes `no`, a string in YAML 1.2 (truthy): it
    must not turn the remap on, nor may a `dataset.contiguous_labels` string or number."""
    word = random.choice(["no", "off", "yes", "on", "n"])
    word = random.choice([word, word.upper(), word.capitalize()])
    for value in (word, random.randint(0, 9)):
        with pytest.raises(PrepareError, match=rf"^prepare\.contiguous_ids={value!r} .*expected true or false"):
            run({"source": "synthetic", "contiguous_ids": value, "synthetic": SYN}, tmp_path / "data")
        assert not list(tmp_path.iterdir())  # refused before any image is drawn
    stats = run({"source": "synthetic", "contiguous_ids": False, "synthetic": SYN}, tmp_path / "data")
    assert [c["id"] for c in stats["categories"]] == [3, 7, 11]
    for value in (word, random.randint(0, 9), None):
        with pytest.raises(PrepareError, match=rf"^dataset\.contiguous_labels={value!r} .*expected true or false"):
            check_spec(stats, {"num_classes": 12, "contiguous_labels": value})
    check_spec(stats, {"num_classes": 12, "contiguous_labels": False})


def test_check_spec_explains_non_contiguous_num_classes(tmp_path):
    stats = run({"source": "synthetic", "synthetic": SYN}, tmp_path / "data")
    check_spec(stats, {"num_classes": 12, "contiguous_labels": False})
    with pytest.raises(SpecError, match="num_classes=12"):
        check_spec(stats, {"num_classes": 11, "contiguous_labels": False})


@pytest.mark.parametrize("images", ["symlink", "copy", "none"])
def test_user_coco_source(tmp_path, images):
    generate(tmp_path / "user", 8, 3, 0, image_size=64, seed=9)
    src = {s: {"json_file": str(tmp_path / "user" / s / "annotations.json"),
               "image_dir": str(tmp_path / "user" / s / "images")} for s in ("train", "val")}
    stats = run({"source": "coco", "coco": {"images": images, **src}}, tmp_path / "data")
    assert set(stats["splits"]) == {"train", "val"} and stats["splits"]["train"]["images"] == 8
    assert not (tmp_path / "data" / "test").exists()
    for s in ("train", "val"):
        assert _coco(tmp_path / "data" / s / "annotations.json") == _coco(Path(src[s]["json_file"]))
        img_dir = tmp_path / "data" / s / "images"
        if images == "none":
            assert not img_dir.exists()
        else:
            first = next(img_dir.iterdir())
            assert first.is_symlink() == (images == "symlink")
            load_coco(tmp_path / "data" / s / "annotations.json", img_dir)


def test_real_coco128_symlinked(tmp_path, coco128):
    src = {"json_file": str(coco128 / "annotations" / "instances.json"),
           "image_dir": str(coco128 / "images")}
    stats = run({"source": "coco", "coco": {"train": src, "val": src}}, tmp_path / "data")
    assert stats["splits"]["train"]["images"] == 128
    assert len(stats["categories"]) == len((tmp_path / "data" / "classmap.txt").read_text().splitlines())
    assert stats["splits"]["train"]["boxes_per_class"]["person"] > 100


def test_bad_user_data_leaves_nothing(tmp_path):
    generate(tmp_path / "user", 4, 2, 0, image_size=64, seed=1)
    train = {"json_file": str(tmp_path / "user" / "train" / "annotations.json"),
             "image_dir": str(tmp_path / "user" / "train" / "images")}
    next((tmp_path / "user" / "train" / "images").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        run({"source": "coco", "coco": {"train": train}}, tmp_path / "data")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [], "categories": [')
    with pytest.raises(CocoFormatError, match="malformed JSON"):
        run({"source": "coco", "coco": {"train": {"json_file": str(broken),
                                                  "image_dir": train["image_dir"]}}}, tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "user"]


def test_splits_must_share_categories(tmp_path):
    generate(tmp_path / "a", 4, 0, 0, image_size=64, seed=1, classes=("circle", "square"))
    generate(tmp_path / "b", 0, 3, 0, image_size=64, seed=1, classes=("circle", "ring"))
    coco = {"images": "none",
            "train": {"json_file": str(tmp_path / "a/train/annotations.json"),
                      "image_dir": str(tmp_path / "a/train/images")},
            "val": {"json_file": str(tmp_path / "b/val/annotations.json"),
                    "image_dir": str(tmp_path / "b/val/images")}}
    with pytest.raises(PrepareError, match="share one category list"):
        run({"source": "coco", "coco": coco}, tmp_path / "data")


def test_bad_params_and_main(tmp_path, capsys):
    with pytest.raises(PrepareError, match="synthetic or coco"):
        run({"source": "kitti"}, tmp_path / "data")
    with pytest.raises(PrepareError, match="prepare.synthetic"):
        run({"source": "synthetic", "synthetic": {"num_trains": 3}}, tmp_path / "data")
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  source: synthetic\n  synthetic: {num_train: 3, num_val: 2, "
                      "num_test: 0, image_size: 64}\ndataset:\n  num_classes: 5\n"
                      "  contiguous_labels: false\n")
    assert prepare.main(["--params", str(params), "--out", str(tmp_path / "data"), "--check-spec"]) == 1
    assert "num_classes=21" in capsys.readouterr().err
    assert prepare.main(["--params", str(params), "--out", str(tmp_path / "data")]) == 0
    assert "train: 3 images" in capsys.readouterr().out


@pytest.mark.parametrize("entry", ["train.json", ["a.json", "imgs"], {"json_file": "J"},
                                   {"image_dir": "I"}, {"json_file": 3, "image_dir": "I"},
                                   {"json_file": " ", "image_dir": "I"}])
def test_bad_coco_split_entry_names_the_key(tmp_path, entry):
    generate(tmp_path / "user", 3, 2, 2, image_size=64, seed=int(np.random.randint(1000)))
    good = {s: {"json_file": str(tmp_path / "user" / s / "annotations.json"),
                "image_dir": str(tmp_path / "user" / s / "images")} for s in ("train", "val", "test")}
    split = str(np.random.choice(["train", "val", "test"]))
    fill = {"J": good[split]["json_file"], "I": good[split]["image_dir"]}
    bad = {k: fill.get(v, v) for k, v in entry.items()} if isinstance(entry, dict) else entry
    lacking = [k for k in ("json_file", "image_dir") if not isinstance(entry, dict) or
               entry.get(k) not in fill]
    expected = ("must be a mapping" if not isinstance(entry, dict) else
                rf"needs json_file and image_dir \(paths\); {' and '.join(lacking)} missing or not a path")
    for extra in ({}, {"inputs": str(tmp_path)}):  # with prepare.inputs, the check of the paths
        with pytest.raises(PrepareError, match=rf"^prepare\.coco\.{split} {expected}"):
            run({"source": "coco", **extra, "coco": {**good, split: bad}}, tmp_path / "data")
    with pytest.raises(PrepareError, match="prepare.coco must be a mapping"):
        run({"source": "coco", "coco": "train.json"}, tmp_path / "data")
    missing = {**good, split: {**good[split], "json_file": str(tmp_path / "nope.json")}}
    with pytest.raises(FileNotFoundError, match=rf"^prepare\.coco\.{split}\.json_file: annotation file "):
        run({"source": "coco", "coco": missing}, tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]


@pytest.mark.parametrize("crash", [OSError, KeyboardInterrupt])
def test_a_crash_while_replacing_the_data_folder_keeps_the_old_one(tmp_path, monkeypatch, crash):
    out = tmp_path / "data"
    first = run({"source": "synthetic", "synthetic": {**SYN, "seed": int(np.random.randint(1000))}}, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_replace = os.replace

    def crashing_replace(src, dst):  # only the rename of the new folder into place fails
        if Path(src).name.startswith(".data.tmp-"):
            raise crash("simulated crash while renaming the new data folder into place")
        real_replace(src, dst)

    monkeypatch.setattr(prepare.os, "replace", crashing_replace)
    second = {**SYN, "seed": int(np.random.randint(1000, 2000)), "num_train": 5}
    with pytest.raises(crash, match="simulated crash"):
        run({"source": "synthetic", "synthetic": second}, out)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert json.loads((out / "stats.json").read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no .data.tmp-*, .data.old-*
    assert run({"source": "synthetic", "synthetic": second}, out)["splits"]["train"]["images"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
