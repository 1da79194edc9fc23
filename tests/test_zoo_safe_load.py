"""`codetr.safe_load`: checkpoints that would run code are refused, never executed."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from codetr.tasks.checkpoint import CheckpointError, load_checkpoint
from codetr.safe_load import (InertObject, UnsafeCheckpointError, _statistics_method_name,
                                  safe_torch_load)


class _CreatesMarker:
    """Unpickling this would create `path` (os.system), the effect a malicious checkpoint has."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


class _OpensMarker(_CreatesMarker):
    def __reduce__(self):
        return open, (self.path, "w")


def _write(kind: str, payload, path):
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, in the protocol torch writes (2) and in Python's default
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2 if kind == "raw2" else pickle.DEFAULT_PROTOCOL)


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw2", "raw"])
@pytest.mark.parametrize("attack", [_CreatesMarker, _OpensMarker])
def test_a_malicious_pickle_is_refused_and_not_executed(tmp_path, kind, attack):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write(kind, {"state_dict": {"w": torch.zeros(2)}, "meta": attack(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_torch_load(path)
    assert not marker.exists()
    message = str(err.value)
    assert "weights_only=False" not in message
    if kind in ("zip", "legacy"):
        assert "not a safe checkpoint" in message
        assert ("posix.system" if attack is _CreatesMarker else "io.open") in message
        expected = "not a safe checkpoint"
    else:  # a bare pickle fails before any global, at the first FRAME opcode (protocol 4) or at
        # torch's own `_load_from_bytes` (protocol 2): refused as not a PyTorch file
        expected = "not a safe checkpoint" if "not a safe checkpoint" in message else "not a PyTorch checkpoint"
        assert expected in message
    # The task-level loader says the same and never runs the file either.
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, require_codetr=False)
    assert not marker.exists()


def test_plain_checkpoints_load_unchanged(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 3}, path)
    ckpt = safe_torch_load(path)
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["state_dict"]["w"], torch.arange(3.0))


def test_the_getattr_stand_in_resolves_only_the_statistics_names():
    assert _statistics_method_name(InertObject, "mean") == "mean"
    for obj, name in ((InertObject, "__class__"), (os, "system"), (InertObject, "__init__")):
        with pytest.raises(pickle.UnpicklingError):
            _statistics_method_name(obj, name)


def test_the_mmengine_training_file_loads_with_inert_stand_ins(mmdet_reference):
    path = mmdet_reference / "tiny_mmengine_checkpoint.pth"
    with pytest.raises(pickle.UnpicklingError):  # what torch alone does
        torch.load(path, weights_only=True)
    ckpt = safe_torch_load(path)
    buffer = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, InertObject)
    assert buffer.state["statistics_methods"] == {n: n for n in ("min", "max", "current", "mean")}
    assert ckpt["meta"]["epoch"] == 12 and len(ckpt["state_dict"]) == 322


def test_a_damaged_file_is_reported_as_unreadable_not_as_unsafe(tmp_path):
    path = tmp_path / "damaged.pth"
    torch.save({"w": torch.zeros(4)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, require_codetr=False)
    assert "is not a PyTorch checkpoint: it is damaged or truncated" in str(err.value)
    assert "not a safe" not in str(err.value)
