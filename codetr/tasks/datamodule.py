"""LightningDataModule over `codetr.data`: the train, val and test splits of a spec."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import lightning as L
import torch

from codetr.data import CocoSource, LabelMap, build_collator, build_dataloader, build_dataset
from codetr.spec.errors import SpecError
from codetr.spec.schema import ExperimentSpec
from codetr.tasks.coco_eval import load_ground_truth


class CoDETRDataModule(L.LightningDataModule):
    """Datasets and loaders of `spec.dataset` (`Batch` items, docs/DESIGN.md data contract).

    Lightning inserts the distributed sampler itself when several processes run; the train
    loader shuffles with the global torch generator, which the checkpoints restore on resume.

    Args:
        spec: the experiment spec (`dataset` is read).
        label_map: category ids <-> label indices of the model.
        eval_input_size: (height, width) to resize val/test images to exactly (None: the
            augmentation's test resize).
        train_sources: the train split's already loaded sources (`load_split_sources`), so the
            train annotations are parsed once (None: loaded in `setup`).
    """

    def __init__(self, spec: ExperimentSpec, label_map: LabelMap,
                 eval_input_size: Optional[Tuple[int, int]] = None,
                 train_sources: Optional[Sequence[CocoSource]] = None) -> None:
        super().__init__()
        self.train_sources = train_sources
        self.spec = spec
        self.label_map = label_map
        self.eval_input_size = eval_input_size
        self.datasets: Dict[str, torch.utils.data.Dataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        """Loads the splits of the stage: 'fit' -> train (+ val when given), 'test' -> test."""
        splits = {"fit": ["train", "val"] if self.has_val() else ["train"],
                  "validate": ["val"], "test": ["test"]}.get(stage or "fit", ["train"])
        for split in splits:
            if split not in self.datasets:
                size = None if split == "train" else self.eval_input_size
                sources = self.train_sources if split == "train" else None
                self.datasets[split] = build_dataset(self.spec, split, self.label_map, size,
                                                     sources=sources)

    def has_val(self) -> bool:
        """Whether the spec names validation data: a val source with json_file OR image_dir (one
        without the other makes `setup` fail naming the key, instead of validation going off)."""
        return any(s.json_file or s.image_dir for s in self.spec.dataset.val_data_sources)

    def ground_truth(self, split: str) -> Dict[str, Any]:
        """The COCO ground truth dict of `split`'s annotation files (original ids and areas)."""
        return load_ground_truth(self.datasets[split].json_files)

    def _loader(self, split: str, shuffle: bool) -> torch.utils.data.DataLoader:
        ds = self.spec.dataset
        train = split == "train"
        size = None if train else self.eval_input_size
        return build_dataloader(self.datasets[split], batch_size=ds.batch_size, workers=ds.workers,
                                shuffle=shuffle, collate_fn=build_collator(self.spec, split, size),
                                drop_last=train)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        """Shuffled, the last partial batch dropped (TAO: `BatchSampler(..., drop_last=True)`; with
        several processes Lightning keeps it when it puts in its `DistributedSampler`).

        Raises:
            SpecError: a process gets fewer images than one batch (an epoch of zero steps).
        """
        world = self.trainer.world_size if self.trainer is not None else 1
        check_one_train_batch(len(self.datasets["train"]), self.spec.dataset.batch_size, world)
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        # No val split: no loader. A dry run's fast_dev_run sets limit_val_batches itself, so
        # Lightning asks for one even when the trainer was told to skip validation.
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", shuffle=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """`Batch` is a dataclass with its own `.to`, which moves the targets too."""
        return batch.to(device)


def check_one_train_batch(num_images: int, batch_size: int, world_size: int = 1) -> None:
    """A SpecError unless each of `world_size` processes gets one full train batch: Lightning's
    `DistributedSampler` gives each ceil(num_images / world_size) images, and `drop_last` drops a
    partial batch, so fewer than `batch_size` would train zero steps without a word."""
    per_process = -(-num_images // max(world_size, 1))
    if per_process < batch_size:
        where = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise SpecError(f"dataset.batch_size={batch_size} is more than the {per_process} train "
                        f"images{where} of dataset.train_data_sources: the last partial batch is "
                        "dropped, so an epoch would have zero steps; lower dataset.batch_size or "
                        "add train images")
