"""The COCO detection Dataset over one or more sources, with either annotation store.

Image ids may collide across sources, so the dataset index (position in the concatenation) is the
internal key; each target keeps its image's ORIGINAL COCO id so a single source evaluates against
its own annotation file. `source_of(index)` tells which source an item came from.
"""
from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from codetr.data.coco import CocoFormatError, CocoSource, ImageRecord
from codetr.data.images import SampleTransform, load_rgb
from codetr.data.labels import LabelMap
from codetr.data.serialized import SerializedStore
from codetr.data.transforms import boxes_to_target

DATASET_TYPES = ("serialized", "default")


class AnnotationStore(Protocol):
    """What the dataset needs from a store: its length and one image's record."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> ImageRecord: ...


class DefaultStore:
    """`dataset_type: default`: a Python list of per-image dicts, as torchvision's CocoDetection.

    Simple, but every worker that reads it gradually copies it (see `serialized.py`).
    """

    def __init__(self, sources: Sequence[CocoSource]) -> None:
        self.image_dirs = [s.image_dir for s in sources]
        self.images: list[dict] = []
        for k, src in enumerate(sources):
            for i in range(len(src)):
                rec = src.record(i, k)
                self.images.append({
                    "id": rec.image_id, "source": k, "file_name": rec.file_name,
                    "height": rec.height, "width": rec.width, "exif": rec.exif,
                    "annotations": [{"id": int(a), "bbox": [float(v) for v in box],
                                     "category_id": int(c), "iscrowd": bool(z)}
                                    for a, box, c, z in zip(rec.ann_ids, rec.boxes,
                                                            rec.category_ids, rec.iscrowd)]})

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int) -> ImageRecord:
        """The record of image `index` (boxes xyxy pixels, as stored)."""
        img = self.images[index]
        anns = img["annotations"]
        return ImageRecord(
            img["id"], img["source"], os.path.join(self.image_dirs[img["source"]], img["file_name"]),
            img["file_name"], img["height"], img["width"],
            np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4),
            np.asarray([a["category_id"] for a in anns], dtype=np.int64),
            np.asarray([a["iscrowd"] for a in anns], dtype=bool),
            np.asarray([a["id"] for a in anns], dtype=np.int64), img["exif"])


def build_store(sources: Sequence[CocoSource], dataset_type: str) -> AnnotationStore:
    """The annotation store of `dataset.dataset_type` ("serialized" or "default")."""
    if dataset_type == "serialized":
        return SerializedStore(sources)
    if dataset_type == "default":
        return DefaultStore(sources)
    raise ValueError(f"dataset_type must be one of {DATASET_TYPES}, got {dataset_type!r}")


def check_categories(sources: Sequence[CocoSource], label_map: LabelMap) -> None:
    """Every annotation's category must be in the label map (e.g. a val file with a new class)."""
    known = np.asarray(label_map.category_ids, dtype=np.int64)
    for src in sources:
        bad = ~np.isin(src.category_ids, known)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CocoFormatError(f"{src.json_file}: annotation id {int(src.ann_ids[i])} has category_id "
                                  f"{int(src.category_ids[i])}, which the label map does not have "
                                  f"(category ids {list(label_map.category_ids)})")


class CocoDetectionDataset(torch.utils.data.Dataset):
    """Items are `(image, target)` per docs/DESIGN.md's data contract.

    `image`: float32 `[3, h, w]` normalised. `target`: boxes float32 `[N, 4]` cxcywh normalised by
    `size`; labels int64 `[N]`; image_id int (original COCO id); orig_size int64 `[2]` (h, w) of the
    decoded image; size int64 `[2]` (h, w) after the transform. Crowd boxes are not targets.
    """

    def __init__(self, sources: Sequence[CocoSource], label_map: LabelMap,
                 transforms: Optional[SampleTransform], dataset_type: str = "serialized") -> None:
        """Packs the loaded sources into the store of `dataset_type`.

        Args:
            sources: validated sources (`codetr.data.coco.load_coco`), concatenated in order.
            label_map: converts category ids to label indices; must know every category used.
            transforms: `codetr.data.transforms.build_transforms(...)`; None keeps the original size
                and scales pixels to [0, 1] only.
            dataset_type: "serialized" (flat arrays shared by workers) or "default" (list of dicts).
        """
        check_categories(sources, label_map)
        self.label_map = label_map
        self.transforms = transforms
        self.dataset_type = dataset_type
        self.json_files = [s.json_file for s in sources]
        # the images kept (`skip_bad_images` may drop some of a file's): what evaluation scores
        self.image_ids = [int(i) for s in sources for i in s.image_ids]
        self.store = build_store(sources, dataset_type)

    def __len__(self) -> int:
        return len(self.store)

    def record(self, index: int) -> ImageRecord:
        """The loaded annotations of item `index`, crowd boxes included."""
        return self.store.get(index)

    def source_of(self, index: int) -> int:
        """Index (into `json_files`) of the source item `index` comes from."""
        return self.store.get(index).source

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        rec = self.store.get(index)
        image = load_rgb(rec.path, apply_exif=rec.exif)
        height, width = image.shape[-2:]
        keep = ~rec.iscrowd
        boxes = torch.from_numpy(np.array(rec.boxes[keep], dtype=np.float32)).reshape(-1, 4)
        labels = torch.from_numpy(self.label_map.labels(rec.category_ids[keep]))
        if self.transforms is None:
            pixels = image.float() / 255.0
            boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                                 boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], 1)
            nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[nonempty], labels[nonempty]
        else:
            # Boxes were clipped to the JSON size; the transform clamps them to the decoded size.
            pixels, boxes, labels = self.transforms(image, boxes, labels)
        size = tuple(pixels.shape[-2:])
        target = {"boxes": boxes_to_target(boxes, size), "labels": labels.long(),
                  "image_id": rec.image_id,
                  "orig_size": torch.tensor([height, width], dtype=torch.int64),
                  "size": torch.tensor(size, dtype=torch.int64)}
        return pixels, target
