"""Training on the CPU is reproducible bit for bit: same spec, same thread count, same weights."""
import pytest
import torch

from codetr.data.synthetic import generate
from codetr.spec import spec_from_dict
from codetr.tasks import train
from test_tasks_e2e import tiny_spec_dict


@pytest.mark.parametrize("threads, workers", [(2, 2)])
def test_two_runs_give_identical_weights(tmp_path, monkeypatch, threads, workers):
    generate(tmp_path / "data", num_train=8, num_val=2, num_test=2, image_size=64, seed=5, max_objects=3)
    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        states = []
        for run in ("a", "b"):
            d = tiny_spec_dict(tmp_path / "data", tmp_path / run, num_epochs=2, enable_ema=True)
            d["dataset"]["workers"] = workers  # forked workers with their own seeded augmentation
            assert train.run(spec_from_dict(d)) == 0
            ckpt = torch.load(tmp_path / run / "train" / "codetr_model.pth", weights_only=True)
            states.append((ckpt["state_dict"], ckpt["ema"]["state_dict"], ckpt["codetr"]["validation"]))
    finally:
        torch.set_num_threads(previous)
    (raw_a, ema_a, val_a), (raw_b, ema_b, val_b) = states
    assert [k for k in raw_a if not torch.equal(raw_a[k], raw_b[k])] == []
    assert [k for k in ema_a if not torch.equal(ema_a[k], ema_b[k])] == []
    assert val_a == val_b
