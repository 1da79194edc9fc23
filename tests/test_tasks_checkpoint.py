"""Checkpoint conversion/IO, partial loading, RNG capture and the weight EMA."""
import collections
import random

import numpy as np
import pytest
import torch
from torch import nn

from codetr.tasks.checkpoint import (AtomicCheckpointIO, CheckpointError, capture_rng_state,
                                     load_checkpoint, load_partial, model_state_dict,
                                     require_same_architecture, restore_rng_state,
                                     to_weights_only_safe)
from codetr.tasks.ema import ModelEMA


def make_net(num_classes: int = 3) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, num_classes, 1))
    return net


def test_unsafe_types_are_converted_or_named(tmp_path):
    sched = torch.optim.lr_scheduler.MultiStepLR(
        torch.optim.SGD([nn.Parameter(torch.randn(2))], lr=0.1), milestones=[3, 5])
    state = {"sched": sched.state_dict(),  # holds a Counter
             "np": np.arange(4, dtype=np.int32), "scalar": np.float32(1.5),
             "od": collections.OrderedDict(a=torch.randn(2)), "t": (1, "x", None)}
    path = tmp_path / "x.pth"
    AtomicCheckpointIO().save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["sched"]["milestones"] == {3: 1, 5: 1}
    assert torch.equal(loaded["np"], torch.arange(4, dtype=torch.int32))
    assert loaded["scalar"] == 1.5 and loaded["t"] == (1, "x", None)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(TypeError, match=r"\['bad'\]"):
        to_weights_only_safe({"bad": object()})


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="garbage.pth is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "garbage.pth")
    torch.save({"state_dict": {"a": torch.randn(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a codetr checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if it ever ran


def test_bad_checkpoints_get_a_reason_and_never_the_weights_only_false_advice(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"a": torch.randn(2)}, "x": _Evil(str(marker))}, tmp_path / "evil.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    expected = {"evil.pth": "is not a safe checkpoint: loading it would need io.open, which could run code",
                "empty.pth": "is empty (0 bytes)",
                "random.pth": "is not a PyTorch checkpoint: its content is not a checkpoint",
                "truncated.pth": "is not a PyTorch checkpoint: it is damaged or truncated"}
    for name, fragment in expected.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name)
        message = str(err.value)
        assert fragment in message, message
        assert "weights_only" not in message and "trusted source" not in message, message
        assert "Traceback" not in message
    assert not marker.exists()


def test_partial_load_skips_mismatched_shapes_and_reports():
    src, dst = make_net(num_classes=5), make_net(num_classes=3)
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    state["model.extra.weight"] = torch.randn(2)
    sd, which = model_state_dict({"state_dict": state, "criterion.w": 1})
    assert which == "raw" and "extra.weight" in sd
    before = dst[2].weight.clone()
    report = load_partial(dst, sd)
    assert torch.equal(dst[0].weight, src[0].weight)  # matching tensors loaded
    assert torch.equal(dst[2].weight, before)  # the 5-class head was skipped
    assert {k for k, _, _ in report.mismatched} == {"2.weight", "2.bias"}
    assert report.unexpected == ["extra.weight"] and not report.missing
    assert "shape mismatch" in report.summary() and "(5, 4, 1, 1)" in report.summary()
    with pytest.raises(CheckpointError, match="another architecture"):
        require_same_architecture(dst, sd, "x.pth")
    require_same_architecture(src, {k: v for k, v in sd.items() if k != "extra.weight"}, "x.pth")


def test_ema_weights_are_preferred():
    net = make_net()
    ema = ModelEMA(net, decay=0.5)
    sd, which = model_state_dict({"state_dict": {"model.a": torch.randn(1)}, "ema": ema.state_dict()})
    assert which == "ema" and set(sd) == set(net.state_dict())
    _, which = model_state_dict({"state_dict": {"model.a": torch.randn(1)}, "ema": ema.state_dict()},
                                prefer_ema=False)
    assert which == "raw"


def test_rng_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = tmp_path / "rng.pth"
    AtomicCheckpointIO().save_checkpoint({"rng": state}, path)
    restore_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_ema_tracks_the_average():
    net = make_net()
    ema = ModelEMA(net, decay=0.9)
    old = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.train()(torch.randn(2, 3, 8, 8) * 2 + 1)  # moves BatchNorm's running statistics
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net[1].num_batches_tracked.fill_(7)
    new = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update(net)
    averaged = ema.module.state_dict()
    # Every floating entry (2 conv weights and biases, BatchNorm's weight, bias, running mean and
    # variance), not only the first. Tolerance: the float32 lerp against the rule in float64
    # erred <= 6.0e-8 over 300 seeds (values <= 1.4: about one ulp); atol 1e-6 is ~17x that.
    floating = [k for k, v in new.items() if v.dtype.is_floating_point]
    assert len(floating) == 8
    for k in floating:
        assert not torch.equal(old[k], new[k]), k
        torch.testing.assert_close(averaged[k].double(), 0.9 * old[k].double() + 0.1 * new[k].double(),
                                   rtol=0, atol=1e-6, msg=k)
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = ModelEMA(make_net(), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1
    torch.testing.assert_close(restored.module[0].weight, ema.module[0].weight)


def test_ema_warmup_ramps_the_decay():
    ema = ModelEMA(make_net(), decay=0.99, warmup_steps=10)
    first = ema.current_decay()
    assert first == pytest.approx(0.99 * (1 - np.exp(-0.1)))
    ema.updates = 1000
    assert ema.current_decay() == pytest.approx(0.99, rel=1e-6)
    with pytest.raises(ValueError):
        ModelEMA(make_net(), decay=0.0)
