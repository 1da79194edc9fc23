"""A damaged `codetr` section of a checkpoint is refused with an error naming the file and the entry
(`codetr.tasks.checkpoint.codetr_section`), never a bare KeyError / AttributeError."""
import pytest
import torch

from codetr.tasks.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, restore_detector

LABEL_MAP = {"category_ids": [1, 3], "names": ["a", "b"], "contiguous": False, "num_classes": 2}


def _weights() -> dict:
    return {"model.query_head.weight": torch.randn(4, 3)}


@pytest.mark.parametrize("section, match", [
    ("hello", r"'codetr' section is a str, not a dict"),
    ({"format_version": 1, "label_map": LABEL_MAP}, r"codetr\.spec must be a dict, it is missing"),
    ({"spec": [1, 2], "label_map": LABEL_MAP}, r"codetr\.spec must be a dict, it is a list"),
    ({"spec": {}, "label_map": "x"}, r"codetr\.label_map must be a dict, it is a str"),
    ({"format_version": "x", "spec": {}, "label_map": LABEL_MAP}, r"format_version is 'x', not an integer"),
    ({"format_version": True, "spec": {}, "label_map": LABEL_MAP}, r"format_version is True, not an integer"),
    ({"format_version": FORMAT_VERSION + 1, "spec": {}, "label_map": LABEL_MAP},
     rf"format version {FORMAT_VERSION + 1}; this codetr reads up to {FORMAT_VERSION}"),
    ({"spec": {}, "label_map": {"names": ["a"]}}, r"codetr\.label_map is malformed \(KeyError"),
])
def test_damaged_codetr_section_names_file_and_entry(tmp_path, section, match):
    path = tmp_path / "last.pth"
    torch.save({"codetr": section, "state_dict": _weights()}, path)
    with pytest.raises(CheckpointError, match=match) as info:
        restore_detector(path)
    assert str(path) in str(info.value)


def test_load_checkpoint_checks_the_section_only_when_it_is_required(tmp_path):
    path = tmp_path / "last.pth"
    torch.save({"codetr": {"spec": "x"}, "state_dict": _weights()}, path)
    assert load_checkpoint(path, require_codetr=False)["codetr"] == {"spec": "x"}  # resume reads weights
    with pytest.raises(CheckpointError, match=r"codetr\.spec must be a dict"):
        load_checkpoint(path)
