"""Subsets of one COCO annotation dict: keep some categories, split the images into train/val/test.

A user's first data set is often one COCO file (or a public one such as coco128) from which a few
classes and a held-out split are wanted. These are pure functions on the parsed JSON dict (the
layout of `instances_*.json`: `images`, `annotations`, `categories`, optional `info`/`licenses`);
`pipeline/prepare.py` and `bench/learning.py --data` both use them, so a benchmark split and a
pipeline split of the same file with the same seed are the same images.

Splits are by image (all boxes of an image go to one split) and deterministic: the image ids are
sorted, then permuted by `numpy.random.default_rng(seed)`, then cut by the fractions.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


class SubsetError(ValueError):
    """A category name or split fraction that cannot be applied; the message names it."""


def select_categories(coco: dict, names: Sequence[str], drop_empty_images: bool = True,
                      where: str = "categories") -> dict:
    """Keeps only the categories named `names` (their original ids) and their annotations.

    Args:
        coco: a parsed COCO annotation dict (not modified).
        names: category names to keep, as in `coco["categories"][i]["name"]` (stripped).
        drop_empty_images: drop the images left without any annotation (images that had none to
            begin with are dropped too); False keeps every image, as negatives.
        where: the key named in error messages (e.g. `prepare.coco.categories`).

    Returns:
        A new dict with the same top-level keys; categories in the file's order.

    Raises:
        SubsetError: an empty list, a repeated name or a name the file does not have (the
            message lists the file's names).
    """
    wanted = [str(n).strip() for n in names]
    if not wanted:
        raise SubsetError(f"{where}: give at least one category name")
    if len(set(wanted)) != len(wanted):
        raise SubsetError(f"{where}: repeated category name in {wanted}")
    by_name = {str(c["name"]).strip(): c for c in coco.get("categories", [])}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SubsetError(f"{where}: unknown category name(s) {unknown}; the file has "
                          f"{sorted(by_name)}")
    keep_ids = {by_name[n]["id"] for n in wanted}
    annotations = [a for a in coco.get("annotations", []) if a["category_id"] in keep_ids]
    images = coco.get("images", [])
    if drop_empty_images:
        used = {a["image_id"] for a in annotations}
        images = [im for im in images if im["id"] in used]
    out = dict(coco)
    out["categories"] = [c for c in coco.get("categories", []) if c["id"] in keep_ids]
    out["annotations"] = annotations
    out["images"] = images
    return out


def split_by_image(coco: dict, fractions: Mapping[str, float], seed: int = 0,
                   where: str = "split") -> Dict[str, dict]:
    """Splits the images (and their annotations) into train and the held-out splits.

    Args:
        coco: a parsed COCO annotation dict (not modified).
        fractions: the held-out fractions, e.g. `{"val": 0.25, "test": 0.0}` (keys from
            `SPLIT_NAMES` other than train; train gets the rest). A split whose fraction is 0 is
            left out of the result. Counts are rounded, each held-out split with a fraction > 0
            gets at least one image, and train keeps at least one.
        seed: the permutation's seed.
        where: the key named in error messages.

    Returns:
        `{split: coco_dict}` for train and every held-out split with images; each dict keeps the
        categories and the other top-level keys of `coco`.

    Raises:
        SubsetError: an unknown split name, a fraction outside [0, 1), fractions summing to 1 or
            more, or too few images to give every split one.
    """
    held = {}
    for name, value in fractions.items():
        if name not in SPLIT_NAMES or name == "train":
            raise SubsetError(f"{where}: unknown held-out split {name!r}; allowed: val, test")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SubsetError(f"{where}.{name} must be a number in [0, 1), got {value!r}") from None
        if not 0.0 <= value < 1.0:
            raise SubsetError(f"{where}.{name} must be in [0, 1), got {value}")
        held[name] = value
    if sum(held.values()) >= 1.0:
        raise SubsetError(f"{where}: held-out fractions {held} leave no training images")
    ids = np.array(sorted(im["id"] for im in coco.get("images", [])), dtype=np.int64)
    ids = ids[np.random.default_rng(seed).permutation(len(ids))]
    counts = {n: max(1, int(round(f * len(ids)))) for n, f in held.items() if f > 0}
    if sum(counts.values()) >= len(ids):
        raise SubsetError(f"{where}: {len(ids)} images are too few for held-out splits {counts} "
                          "and a training split")
    assigned: Dict[int, str] = {}
    start = 0
    for name in SPLIT_NAMES[1:]:
        if name in counts:
            assigned.update({int(i): name for i in ids[start:start + counts[name]]})
            start += counts[name]
    assigned.update({int(i): "train" for i in ids[start:]})
    result = {}
    for name in ("train",) + tuple(n for n in SPLIT_NAMES[1:] if n in counts):
        part = dict(coco)
        part["images"] = [im for im in coco.get("images", []) if assigned[im["id"]] == name]
        part["annotations"] = [a for a in coco.get("annotations", [])
                               if assigned.get(a["image_id"]) == name]
        result[name] = part
    return result
