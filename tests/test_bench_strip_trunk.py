"""bench/strip_trunk.py: a trained model's neck, transformer and heads as the initialisation of a
model of another class count, its own trunk untouched (`train.pretrained_model_path`)."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from export_fixtures import random_model, tiny_model_dict, write_checkpoint  # noqa: E402
from strip_trunk import main  # noqa: E402

from codetr.tasks.train import load_pretrained  # noqa: E402


def test_stripped_weights_initialise_all_but_the_trunk_and_class_layers(tmp_path):
    source, _ = write_checkpoint(tmp_path / "trained.pth", tiny_model_dict(), seed=1, num_classes=21)
    main([str(tmp_path / "trained.pth"), str(tmp_path / "stripped.pth")])
    target, _ = random_model(tiny_model_dict(), seed=2, num_classes=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    load_pretrained(target, str(tmp_path / "stripped.pth"))
    after, trained = target.state_dict(), source.state_dict()
    floats = [k for k in after if after[k].is_floating_point() and after[k].numel() > 1]
    trunk = [k for k in floats if k.startswith("backbone.")]
    copied = [k for k in floats if not k.startswith("backbone.") and trained[k].shape == after[k].shape]
    skipped = [k for k in floats if not k.startswith("backbone.") and trained[k].shape != after[k].shape]
    assert trunk and copied and skipped  # every kind of tensor is there to be checked
    # the two random models agree only where initialisation is constant (norm weights of 1):
    distinct = [k for k in floats if not torch.equal(before[k], trained[k])]
    assert all(torch.equal(after[k], before[k]) for k in trunk)
    assert all(torch.equal(after[k], trained[k]) for k in copied)
    assert all(torch.equal(after[k], before[k]) for k in skipped)   # the 3-class layers stay new
    assert len(set(trunk) & set(distinct)) > 10 and len(set(copied) & set(distinct)) > 10
    assert {"bbox_head.0.atss_cls.weight", "query_head.label_embedding.weight"} <= set(skipped)

def test_a_file_without_trunk_is_refused(tmp_path):
    torch.save({"state_dict": {"neck.0.weight": torch.randn(2, 2)}}, tmp_path / "x.pth")
    with pytest.raises(SystemExit, match="backbone"):
        main([str(tmp_path / "x.pth"), str(tmp_path / "y.pth")])
    assert not (tmp_path / "y.pth").exists()
