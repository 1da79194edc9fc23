"""The trainer's checkpoint files: `model_epoch_<NNN>.pth` every `checkpoint_interval` epochs and
`last.pth` after EVERY epoch (what auto-resume continues from).

Lightning's `ModelCheckpoint(save_last=True)` writes `last` only in the epochs it also writes a
periodic checkpoint, so with `checkpoint_interval > 1` a crash would lose up to interval - 1
epochs and a finished run would "resume" from an older `last.pth`; `EpochCheckpoint` writes it in
the other epochs too. Writes go through the trainer's atomic checkpoint IO.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class EpochCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also writes `last` in epochs without a periodic checkpoint."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # nothing saved at this step yet (no periodic file): write last alone
        if not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_callback(train_dir: str, interval: int) -> EpochCheckpoint:
    """`model_epoch_<NNN>.pth` (0-based epoch) every `interval` epochs, `last.pth` after every epoch."""
    callback = EpochCheckpoint(dirpath=train_dir, filename="model_epoch_{epoch:03d}",
                               auto_insert_metric_name=False, every_n_epochs=interval,
                               save_top_k=-1, save_last=True, save_on_train_epoch_end=True,
                               enable_version_counter=False)
    callback.FILE_EXTENSION = ".pth"
    callback.CHECKPOINT_NAME_LAST = "last"
    return callback
