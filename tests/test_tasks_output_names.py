"""Inference output names are contained, collision-free by construction and indexed."""
import json
import random

import pytest

from codetr.tasks.output_names import (ForeignOutputsError, clear_previous_outputs, encode_component,
                                       output_stems, write_index)


def stems_of(names, root="/in"):
    items = [(root, n) for n in names]
    return {rel: str(stem) for (_, rel), stem in output_stems(items).items()}


def test_the_names_that_used_to_collide_are_distinct_in_any_order():
    for names in (["a b.jpg", "a_b.jpg"], ["a_b.jpg", "a b.jpg"], ["名.jpg", "字.jpg"]):
        stems = stems_of(names)
        assert len(set(stems.values())) == 2
    assert stems_of(["a b.jpg", "a_b.jpg"]) == stems_of(["a_b.jpg", "a b.jpg"])
    assert stems_of(["a b.jpg", "a_b.jpg"]) == {"a b.jpg": "a%20b", "a_b.jpg": "a_b"}
    assert stems_of(["000001.jpg"]) == {"000001.jpg": "000001"}  # TAO's name where it is unique


def test_same_stem_keeps_the_extension_and_cannot_meet_a_dotted_stem():
    stems = stems_of(["a.jpg", "a.png", "a.jpg.png", "sub/a.jpg"])
    assert stems == {"a.jpg": "a.jpg", "a.png": "a.png", "a.jpg.png": "a%2Ejpg", "sub/a.jpg": "sub/a"}


def test_random_hostile_names_never_collide_or_escape(tmp_path):
    rng = random.Random(7)
    alphabet = list("aB_-. %/名") + ["..", "\u00fc", "\u0301"]
    names = set()
    while len(names) < 400:
        parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        name = "/".join(p.strip("/") or "x" for p in parts) + rng.choice([".jpg", ".png", ".JPG"])
        if all(part not in ("", ".", "..") for part in name.split("/")):
            names.add(name)
    items = [("/r0", n) for n in sorted(names)] + [("/r1", n) for n in sorted(names)[:50]]
    stems = output_stems(items)
    assert len(set(stems.values())) == len(items)
    labels = (tmp_path / "labels").resolve()
    for stem in stems.values():
        assert ".." not in stem.parts and "." not in stem.parts and not stem.is_absolute()
        assert (labels / f"{stem}.txt").resolve().is_relative_to(labels)
        assert stem.parts[0] in ("0", "1")  # several input folders are kept apart


def test_encoding_is_injective_on_the_tricky_cases():
    samples = ["a.b", "a%2Eb", "a b", "a%20b", "%", "%25", "é", "e\u0301", ".", "..", "-", "_"]
    encoded = [encode_component(s) for s in samples]
    assert len(set(encoded)) == len(samples)
    assert all("." not in e for e in encoded)


def _write_run(out, files):
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("x")
    write_index(out, [{"image": f"/in/{i}", "labels": f, "annotated": None, "detections": 0}
                      for i, f in enumerate(files)], complete=False)


def test_previous_run_outputs_are_cleared(tmp_path):
    _write_run(tmp_path, ["labels/a.txt", "labels/sub/b.txt"])
    assert clear_previous_outputs(tmp_path, ("labels", "images_annotated")) == 2
    assert not list((tmp_path / "labels").rglob("*.txt")) and not (tmp_path / "labels" / "sub").exists()


def test_foreign_files_stop_the_run_and_nothing_is_removed(tmp_path):
    _write_run(tmp_path, ["labels/a.txt"])
    (tmp_path / "labels" / "mine.txt").write_text("keep me")
    with pytest.raises(ForeignOutputsError, match="mine.txt"):
        clear_previous_outputs(tmp_path, ("labels", "images_annotated"))
    assert (tmp_path / "labels" / "a.txt").exists() and (tmp_path / "labels" / "mine.txt").exists()
    assert json.loads((tmp_path / "index.json").read_text())["complete"] is False
