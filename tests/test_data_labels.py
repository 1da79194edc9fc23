"""LabelMap rules and the classmap file."""
import json
import random

import numpy as np
import pytest

from codetr.data.classmap import (ClassmapError, apply_classmap, label_map_from_classmap,
                                  read_classmap, write_classmap)
from codetr.data.labels import LabelMap
from codetr.spec import SpecError


def random_categories(seed: int, k: int = 6) -> list[dict]:
    rng = random.Random(seed)
    ids = rng.sample(range(1, 60), k)
    return [{"id": i, "name": f"class_{i}"} for i in ids]  # unsorted on purpose


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contiguous_round_trip(seed):
    cats = random_categories(seed)
    lm = LabelMap.from_categories(cats, num_classes=len(cats), contiguous=True)
    ids = sorted(c["id"] for c in cats)
    assert lm.category_ids == tuple(ids)
    assert [lm.label(i) for i in ids] == list(range(len(ids)))
    for label in range(len(ids)):
        assert lm.label(lm.category_id(label)) == label
        assert lm.name(label) == f"class_{lm.category_id(label)}"
    assert lm.names == tuple(f"class_{i}" for i in ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_non_contiguous_label_is_category_id(seed):
    cats = random_categories(seed)
    top = max(c["id"] for c in cats)
    lm = LabelMap.from_categories(cats, num_classes=top + 1, contiguous=False)
    for c in cats:
        assert lm.label(c["id"]) == c["id"] and lm.category_id(c["id"]) == c["id"]
    lut = lm.category_id_lut()
    assert lut.shape == (top + 1,)
    assert set(np.flatnonzero(lut >= 0).tolist()) == {c["id"] for c in cats}
    assert not lm.has_label(0)
    with pytest.raises(KeyError, match="no category"):
        lm.category_id(0)


def test_num_classes_errors_say_what_to_set():
    cats = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 90, "name": "c"}]
    with pytest.raises(SpecError, match=r"dataset.num_classes=80 but the annotations have 3 "
                                        r"categories; set dataset.num_classes=3"):
        LabelMap.from_categories(cats, 80, contiguous=True)
    with pytest.raises(SpecError, match=r"set dataset.num_classes=91"):
        LabelMap.from_categories(cats, 90, contiguous=False)
    assert LabelMap.from_categories(cats, 91, contiguous=False).num_classes == 91
    with pytest.raises(SpecError, match="category id 0 is reserved"):
        LabelMap.from_categories([{"id": 0, "name": "bg"}, {"id": 1, "name": "a"}], 5, False)
    # id 0 is fine when remapped to contiguous labels.
    assert LabelMap.from_categories([{"id": 0, "name": "z"}, {"id": 1, "name": "a"}], 2, True).label(0) == 0


def test_unknown_ids_raise_keyerror():
    lm = LabelMap.from_categories(random_categories(3), 6, True)
    with pytest.raises(KeyError, match="category id 999"):
        lm.label(999)
    with pytest.raises(KeyError):
        lm.name(6)


def test_dict_round_trip_is_json_safe():
    lm = LabelMap.from_categories(random_categories(4), 60, contiguous=False)
    data = json.loads(json.dumps(lm.to_dict()))
    back = LabelMap.from_dict(data)
    assert back == lm
    assert [back.label(i) for i in lm.category_ids] == [lm.label(i) for i in lm.category_ids]


def test_vectorised_labels_match_scalar():
    lm = LabelMap.from_categories(random_categories(5), 6, True)
    rng = np.random.default_rng(0)
    ids = rng.choice(lm.category_ids, size=20)
    assert lm.labels(ids).tolist() == [lm.label(i) for i in ids]
    assert lm.labels(np.zeros(0, np.int64)).dtype == np.int64


def test_classmap_write_read_round_trip(tmp_path):
    lm = LabelMap.from_categories(random_categories(6), 6, True)
    path = tmp_path / "classmap.txt"
    write_classmap(path, lm.names)
    assert path.read_text().splitlines() == list(lm.names)
    assert read_classmap(path) == list(lm.names)
    renamed = [f"n{i}" for i in range(6)]
    write_classmap(path, renamed)
    assert apply_classmap(lm, path).names == tuple(renamed)


def test_classmap_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.txt"
    with pytest.raises(ClassmapError, match="bad.txt does not exist"):
        read_classmap(path)
    path.write_text("cat\n\ndog\n")
    with pytest.raises(ClassmapError, match=r"bad.txt:2: empty line"):
        read_classmap(path)
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ClassmapError, match=r"bad.txt:3: class name 'cat' repeats line 1"):
        read_classmap(path)
    path.write_text("\n\n")
    with pytest.raises(ClassmapError, match="no class names"):
        read_classmap(path)
    path.write_text("a\nb\n\n")  # trailing blank lines are fine
    assert read_classmap(path) == ["a", "b"]
    lm = LabelMap.from_categories(random_categories(7, k=3), 3, True)
    with pytest.raises(ClassmapError, match="bad.txt has 2 names but the model has 3"):
        apply_classmap(lm, path)
    with pytest.raises(ClassmapError, match="one non-empty line"):
        write_classmap(tmp_path / "w.txt", ["a", "b\nc"])


def test_label_map_from_classmap_lines_are_ids(tmp_path):
    path = tmp_path / "c.txt"
    write_classmap(path, ["person", "car", "tree"])
    lm = label_map_from_classmap(path, 4, contiguous=False)
    assert lm.category_ids == (1, 2, 3) and lm.name(2) == "car"
    assert label_map_from_classmap(path, 3, contiguous=True).name(0) == "person"
    with pytest.raises(SpecError, match="set dataset.num_classes=3"):
        label_map_from_classmap(path, 4, contiguous=True)


def test_label_map_pickles_for_spawned_workers():
    import pickle

    lm = LabelMap.from_categories(random_categories(8), 60, contiguous=False)
    back = pickle.loads(pickle.dumps(lm))
    assert back == lm and [back.label(i) for i in lm.category_ids] == list(lm.category_ids)
