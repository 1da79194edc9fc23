"""A resumed run keeps the learning-rate decay on its epochs when its steps per epoch differ from
the run that wrote the checkpoint (another batch size or GPU count): TAO steps its schedulers per
epoch (`codetr.tasks.optim.lr_factor`'s `origin`, set by `CoDETRModule.on_train_start`)."""
import random

import pytest

from codetr.spec import spec_from_dict
from codetr.tasks import train
from codetr.tasks.module import CoDETRModule
from tests.test_tasks_e2e import data, tiny_spec_dict  # noqa: F401 - `data` is a fixture


def _record_base_lr(monkeypatch) -> dict:
    """{global step: lr of the `base` group used by that step}, filled as training runs."""
    seen = {}

    def on_train_batch_start(self, batch, batch_idx):
        group = next(g for g in self.trainer.optimizers[0].param_groups if g["name"] == "base")
        seen[self.global_step] = group["lr"]

    monkeypatch.setattr(CoDETRModule, "on_train_batch_start", on_train_batch_start)
    return seen


def test_resume_with_another_batch_size_keeps_the_decay_epoch(data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # outside any git repository: DVCLive logs plainly
    lrs = _record_base_lr(monkeypatch)
    lr = random.choice([1e-3, 2e-3, 5e-4])
    optim = {"lr": lr, "lr_backbone": lr / 10, "lr_steps": [2], "warmup_steps": 0}
    first = tiny_spec_dict(data, tmp_path / "r", num_epochs=1, optim=optim)
    first["dataset"]["batch_size"] = 4  # 4 images: 1 step per epoch
    assert train.run(spec_from_dict(first)) == 0
    resumed = tiny_spec_dict(data, tmp_path / "r", num_epochs=3, optim=optim)  # batch 2: 2 steps
    assert train.run(spec_from_dict(resumed)) == 0
    # step 0: epoch 0 (batch 4); steps 1-2: epoch 1; steps 3-4: epoch 2 = lr_steps[0], decayed.
    # Counting every step at the new 2 steps per epoch would put step 3 in epoch 1 (decay late).
    assert sorted(lrs) == [0, 1, 2, 3, 4]
    assert [lrs[s] for s in range(5)] == pytest.approx([lr, lr, lr, lr * 0.1, lr * 0.1])
