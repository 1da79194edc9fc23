"""`dataset_type: serialized`: all annotations in a handful of flat numpy arrays.

Why: a forked DataLoader worker shares its parent's memory pages until it writes to them, and
merely *reading* a Python object writes its reference count. A list of per-image dicts (one object
per image, box, number and string) is therefore copied page by page into every worker as the epoch
touches it, so memory grows with workers x annotations. A numpy array is a single object whose
data buffer is never written by reads, so its pages stay shared (see bench/data_memory.py).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from codetr.data.coco import CocoSource, ImageRecord


def _offsets(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


class SerializedStore:
    """Images and annotations of several sources packed into flat arrays.

    Arrays: image_ids, heights, widths int64 `[I]`; sources int32 `[I]`; ann_offsets int64 `[I+1]`
    (annotations of image i are rows ann_offsets[i]:ann_offsets[i+1]); boxes float32 `[A, 4]` xyxy
    pixels; category_ids, ann_ids int64 `[A]`; iscrowd bool `[A]`; name_offsets int64 `[I+1]` into
    name_bytes uint8 (all file names, UTF-8, concatenated). `image_dirs` holds one string per source.
    """

    def __init__(self, sources: Sequence[CocoSource]) -> None:
        """Packs the sources in order; the store's image i is the i-th image of their concatenation."""
        names = [n.encode("utf-8") for s in sources for n in s.file_names]
        self.image_dirs = [s.image_dir for s in sources]
        self.image_ids = np.concatenate([s.image_ids for s in sources] or [np.zeros(0, np.int64)])
        self.heights = np.concatenate([s.heights for s in sources] or [np.zeros(0, np.int64)])
        self.widths = np.concatenate([s.widths for s in sources] or [np.zeros(0, np.int64)])
        self.sources = np.concatenate(
            [np.full(len(s), k, dtype=np.int32) for k, s in enumerate(sources)] or [np.zeros(0, np.int32)])
        self.ann_offsets = _offsets(np.concatenate([np.diff(s.ann_offsets) for s in sources]
                                                   or [np.zeros(0, np.int64)]))
        self.boxes = np.concatenate([s.boxes for s in sources] or [np.zeros((0, 4), np.float32)])
        self.category_ids = np.concatenate([s.category_ids for s in sources] or [np.zeros(0, np.int64)])
        self.iscrowd = np.concatenate([s.iscrowd for s in sources] or [np.zeros(0, bool)])
        self.ann_ids = np.concatenate([s.ann_ids for s in sources] or [np.zeros(0, np.int64)])
        self.exif = np.concatenate([s.exif if len(s.exif) == len(s) else np.ones(len(s), bool)
                                    for s in sources] or [np.zeros(0, bool)])
        self.name_offsets = _offsets([len(n) for n in names])
        self.name_bytes = np.frombuffer(b"".join(names), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.image_ids)

    def nbytes(self) -> int:
        """Total size of the arrays in bytes."""
        return sum(a.nbytes for a in (self.image_ids, self.heights, self.widths, self.sources,
                                      self.ann_offsets, self.boxes, self.category_ids, self.iscrowd,
                                      self.ann_ids, self.name_offsets, self.name_bytes, self.exif))

    def get(self, index: int) -> ImageRecord:
        """The record of image `index` (array slices are views: nothing shared is written)."""
        a, b = int(self.ann_offsets[index]), int(self.ann_offsets[index + 1])
        n0, n1 = int(self.name_offsets[index]), int(self.name_offsets[index + 1])
        file_name = self.name_bytes[n0:n1].tobytes().decode("utf-8")
        source = int(self.sources[index])
        return ImageRecord(int(self.image_ids[index]), source,
                           os.path.join(self.image_dirs[source], file_name), file_name,
                           int(self.heights[index]), int(self.widths[index]), self.boxes[a:b],
                           self.category_ids[a:b], self.iscrowd[a:b], self.ann_ids[a:b],
                           bool(self.exif[index]))
