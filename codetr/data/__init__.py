"""COCO data: loading + validation, LabelMap, classmap, datasets, transforms, collate, image folders."""
from codetr.data.build import (build_collator, build_dataloader, build_dataset, build_infer_dataset,
                               build_label_map, load_split_sources)
from codetr.data.classmap import ClassmapError, apply_classmap, read_classmap, write_classmap
from codetr.data.coco import CocoFormatError, CocoSource, DataWarning, ImageRecord, load_coco
from codetr.data.collate import Batch, Collator, ImageBatch, collate_fn
from codetr.data.dataset import CocoDetectionDataset
from codetr.data.images import ImageDecodeError, ImageFolderDataset, load_rgb
from codetr.data.labels import LabelMap
from codetr.data.transforms import build_transforms

__all__ = [
    "LabelMap", "read_classmap", "write_classmap", "apply_classmap", "ClassmapError",
    "load_coco", "CocoSource", "ImageRecord", "CocoFormatError", "DataWarning",
    "CocoDetectionDataset", "ImageFolderDataset", "ImageDecodeError", "load_rgb",
    "build_transforms", "Batch", "ImageBatch", "Collator", "collate_fn",
    "build_label_map", "build_dataset", "build_infer_dataset", "build_collator", "build_dataloader",
    "load_split_sources",
]
