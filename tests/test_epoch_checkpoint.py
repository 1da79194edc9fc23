"""`last.pth` is written after every epoch, also between `checkpoint_interval` files."""
import torch

from codetr.data.synthetic import generate
from codetr.spec import spec_from_dict
from codetr.tasks import train
from tests.test_tasks_e2e import tiny_spec_dict


def test_last_after_every_epoch_with_a_checkpoint_interval(tmp_path, monkeypatch, capsys):
    generate(tmp_path / "data", num_train=4, num_val=2, num_test=2, image_size=64, seed=2, max_objects=3)
    monkeypatch.chdir(tmp_path)
    options = dict(num_epochs=3, checkpoint_interval=2, validation_interval=2, enable_ema=False)
    spec = spec_from_dict(tiny_spec_dict(tmp_path / "data", tmp_path / "res", **options))
    assert train.run(spec) == 0
    train_dir = tmp_path / "res" / "train"
    assert sorted(p.name for p in train_dir.glob("model_epoch_*.pth")) == ["model_epoch_001.pth"]
    last = torch.load(train_dir / "last.pth", map_location="cpu", weights_only=True)
    steps_per_epoch = 2  # 4 images, batch 2
    assert (last["epoch"], last["global_step"]) == (2, 3 * steps_per_epoch)  # the final epoch
    capsys.readouterr()
    assert train.run(spec) == 0  # a finished run started again trains no epoch
    again = torch.load(train_dir / "last.pth", map_location="cpu", weights_only=True)
    assert again["global_step"] == 3 * steps_per_epoch
