"""LightningDataModule over `codetr.data`: the train, val and test splits of a spec."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import lightning as L
import torch

from codetr.data import CocoSource, LabelMap, build_collator, build_dataloader, build_dataset
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
        """Whether the spec names validation data."""
        return any(s.json_file for s in self.spec.dataset.val_data_sources)

    def ground_truth(self, split: str) -> Dict[str, Any]:
        """The COCO ground truth dict of `split`'s annotation files (original ids and areas)."""
        return load_ground_truth(self.datasets[split].json_files)

    def _loader(self, split: str, shuffle: bool) -> torch.utils.data.DataLoader:
        ds = self.spec.dataset
        size = None if split == "train" else self.eval_input_size
        return build_dataloader(self.datasets[split], batch_size=ds.batch_size, workers=ds.workers,
                                shuffle=shuffle, collate_fn=build_collator(self.spec, split, size),
                                drop_last=False)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", shuffle=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """`Batch` is a dataclass with its own `.to`, which moves the targets too."""
        return batch.to(device)
