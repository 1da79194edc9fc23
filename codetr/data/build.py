"""Where the spec meets the data classes: label map, datasets, collators and dataloaders."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from codetr.data.classmap import label_map_from_classmap
from codetr.data.coco import CocoFormatError, CocoSource, load_coco
from codetr.data.collate import Collator
from codetr.data.dataset import CocoDetectionDataset
from codetr.data.fixed_padding import fixed_padding_collator
from codetr.data.images import ImageFolderDataset
from codetr.data.labels import LabelMap
from codetr.data.test_padding import LSJTestCollator, LSJTrainCollator
from codetr.data.transforms import build_transforms, max_output_size
from codetr.spec.errors import SpecError
from codetr.spec.schema import DataSource, ExperimentSpec

SPLITS = ("train", "val", "test")


def split_sources(spec: ExperimentSpec, split: str) -> list[DataSource]:
    """The `DataSource`s of a split ("train", "val" or "test"); a SpecError when there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ds = spec.dataset
    sources = {"train": ds.train_data_sources, "val": ds.val_data_sources,
               "test": [ds.test_data_sources] if ds.test_data_sources else []}[split]
    given = [(i, s) for i, s in enumerate(sources) if s.json_file or s.image_dir]
    if not given:
        raise SpecError(f"dataset.{split}_data_sources is empty; give image_dir and json_file")
    for i, s in given:  # i: the index in the spec's list
        if not s.json_file or not s.image_dir:
            key = f"dataset.{split}_data_sources" + ("" if split == "test" else f"[{i}]")
            raise SpecError(f"{key} needs both image_dir and json_file (image_dir={s.image_dir!r}, "
                            f"json_file={s.json_file!r})")
    return [s for _, s in given]


def json_file_key(spec: ExperimentSpec, split: str, source: DataSource) -> str:
    """The dotted spec key of `source.json_file`, e.g. `dataset.train_data_sources[1].json_file`
    (the index in the spec's list, which `split_sources` may have filtered)."""
    if split == "test":
        return "dataset.test_data_sources.json_file"
    listed = getattr(spec.dataset, f"{split}_data_sources")
    index = next((i for i, s in enumerate(listed) if s is source), "?")
    return f"dataset.{split}_data_sources[{index}].json_file"


def load_split_sources(spec: ExperimentSpec, split: str) -> list[CocoSource]:
    """Loads and validates every source of a split (see `codetr.data.coco.load_coco`)."""
    skip = spec.dataset.skip_bad_images
    return [load_coco(s.json_file, s.image_dir, skip_bad_images=skip, where=json_file_key(spec, split, s))
            for s in split_sources(spec, split)]


def merge_categories(sources: Sequence[CocoSource]) -> list[dict]:
    """The union of the sources' categories; one id with two names, or one name with two ids (as
    within one file: the classmap and color_map key on names), is an error naming both files."""
    merged: dict[int, tuple[str, str]] = {}
    by_name: dict[str, tuple[int, str]] = {}
    for src in sources:
        for cat in src.categories:
            seen = merged.setdefault(cat["id"], (cat["name"], src.json_file))
            if seen[0] != cat["name"]:
                raise CocoFormatError(f"category id {cat['id']} is '{seen[0]}' in {seen[1]} but "
                                      f"'{cat['name']}' in {src.json_file}")
            named = by_name.setdefault(cat["name"], (cat["id"], src.json_file))
            if named[0] != cat["id"]:
                raise CocoFormatError(f"category '{cat['name']}' is id {named[0]} in {named[1]} but id "
                                      f"{cat['id']} in {src.json_file}; names must be unique (the "
                                      "classmap and color_map key on names)")
    return [{"id": cid, "name": name} for cid, (name, _) in sorted(merged.items())]


def build_label_map(spec: ExperimentSpec, checkpoint_label_map: Optional[LabelMap | Mapping] = None,
                    train_sources: Optional[Sequence[CocoSource]] = None) -> LabelMap:
    """The label map of an experiment.

    Priority: the checkpoint's map (it defines the trained model); else the categories of the train
    sources (`train_sources` when already loaded), else of the val or test sources; else the
    inference classmap (line i = category id i).

    Raises:
        SpecError: `dataset.num_classes` does not fit the categories (the message says what to set).
    """
    if checkpoint_label_map is not None:
        if isinstance(checkpoint_label_map, LabelMap):
            return checkpoint_label_map
        return LabelMap.from_dict(checkpoint_label_map)
    ds = spec.dataset
    if train_sources is None:
        for split in SPLITS:
            try:
                specs = split_sources(spec, split)
            except SpecError:
                continue
            train_sources = [load_coco(s.json_file, s.image_dir, check_files=False,
                                       where=json_file_key(spec, split, s)) for s in specs]
            break
    if train_sources:
        return LabelMap.from_categories(merge_categories(train_sources), ds.num_classes,
                                        ds.contiguous_labels)
    if ds.infer_data_sources is not None and ds.infer_data_sources.classmap:
        return label_map_from_classmap(ds.infer_data_sources.classmap, ds.num_classes,
                                       ds.contiguous_labels, where="dataset.infer_data_sources.classmap")
    raise SpecError("no categories to build the label map from: give dataset.train_data_sources, "
                    "val/test data sources, or dataset.infer_data_sources.classmap")


def build_dataset(spec: ExperimentSpec, split: str, label_map: LabelMap,
                  input_size: Optional[tuple[int, int]] = None,
                  sources: Optional[Sequence[CocoSource]] = None) -> CocoDetectionDataset:
    """The dataset of a split: train transforms for "train", eval transforms otherwise.

    Args:
        input_size: (height, width) to resize eval images to exactly (evaluate/inference option).
        sources: the split's already loaded sources (else they are loaded now).
    """
    if sources is None:
        sources = load_split_sources(spec, split)
    transforms = build_transforms(spec.dataset.augmentation, split == "train", input_size)
    return CocoDetectionDataset(sources, label_map, transforms, spec.dataset.dataset_type)


def build_infer_dataset(spec: ExperimentSpec,
                        input_size: Optional[tuple[int, int]] = None) -> ImageFolderDataset:
    """The images of `dataset.infer_data_sources.image_dir` with the eval transform."""
    infer = spec.dataset.infer_data_sources
    if infer is None or not infer.image_dir:
        raise SpecError("dataset.infer_data_sources.image_dir is not set")
    return ImageFolderDataset(infer.image_dir, build_transforms(spec.dataset.augmentation, False, input_size),
                              where="dataset.infer_data_sources.image_dir")


def build_collator(spec: ExperimentSpec, split: str,
                   input_size: Optional[tuple[int, int]] = None) -> Collator:
    """Padding of a split: to a multiple of `pad_size_divisor`, and with `fixed_padding` (or, for
    training, `fixed_random_crop`) as `codetr.data.fixed_padding` sets it (TAO's per-orientation
    FixedPad; one fixed size for LSJ training or an eval `input_size`). Eval splits with
    `test_padding: lsj` get mmdet's LSJ test padding (`codetr.data.test_padding`)."""
    aug = spec.dataset.augmentation
    train = split == "train"
    if not train and aug.test_padding == "lsj":
        return LSJTestCollator(max_output_size(aug, False, input_size), aug.pad_size_divisor,
                               aug.input_mean, aug.input_std)
    if train and aug.train_padding == "lsj":
        return LSJTrainCollator(max_output_size(aug, True, input_size), aug.pad_size_divisor,
                                aug.input_mean, aug.input_std)
    if aug.fixed_padding or (train and aug.fixed_random_crop is not None):
        return fixed_padding_collator(aug, train, input_size)
    return Collator(aug.pad_size_divisor)


def build_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, shuffle: bool,
                     collate_fn: Collator | None = None, drop_last: bool = False,
                     seed: Optional[int] = None, pin_memory: bool = False
                     ) -> torch.utils.data.DataLoader:
    """A DataLoader with forked workers kept alive across epochs.

    Args:
        collate_fn: a `Collator` (its `images` method for an `ImageFolderDataset`); default pads to
            the batch maximum.
        seed: seeds the shuffling and, through it, each worker's torch RNG (random augmentation).
    """
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    if collate_fn is None:
        collate_fn = Collator()
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        collate_fn=collate_fn, drop_last=drop_last, generator=generator, pin_memory=pin_memory,
        persistent_workers=workers > 0)
