"""The training setup every step benchmark starts from (`train_step.py`, `msda.py --step`,
`step_profile.py`): a `bench/learning.py` model variant of the default spec, its seeded train
loader, criterion and the trainer's optimizer groups."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from codetr.data.build import build_collator, build_dataloader, build_dataset, build_label_map
from codetr.spec.schema import ExperimentSpec
from codetr.tasks.optim import build_optimizer, build_param_groups
from learning_data import BenchData, bench_spec
from learning_run import build_detector


@dataclass
class TrainingSetup:
    """What one training step needs; `model` and `criterion` speak our contract (DESIGN.md)."""
    spec: ExperimentSpec
    loader: torch.utils.data.DataLoader
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer


def training_setup(params: Path, data: BenchData, batch: int, model_name: str = "ours") -> TrainingSetup:
    """The `model_name` variant (`ours`, `ours_no_co`, `ours_rcnn`, `peer`) at `batch` images per
    step, random trunk (no pretrained file), seeds fixed."""
    spec = bench_spec(params, data, None, model_name,
                      [f"dataset.batch_size={batch}", "model.pretrained_backbone_path=null"])
    torch.manual_seed(0)
    labels = build_label_map(spec)
    loader = build_dataloader(build_dataset(spec, "train", labels), batch, 0, True,
                              build_collator(spec, "train"), drop_last=True, seed=0)
    model, criterion, _ = build_detector(model_name, spec, labels.num_classes)
    optimizer = build_optimizer(build_param_groups(model, spec.train.optim), spec.train.optim)
    return TrainingSetup(spec, loader, model, criterion, optimizer)
