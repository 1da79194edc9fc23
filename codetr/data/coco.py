"""Loading and validating one COCO source (annotation JSON + image folder) into flat arrays.

Every problem that would otherwise surface mid-epoch or silently corrupt training is found here,
before the first step: malformed JSON (file and line), duplicate or zero ids, unknown image or
category ids, file names escaping the image folder, missing image files. Boxes are clipped to the
image; boxes left empty are dropped with a `DataWarning` that counts them.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np

from codetr.data.errors import CocoFormatError, DataWarning
from codetr.errors import MissingInputError
from codetr.data.image_check import check_files_exist, fill_missing_sizes, verify_images


@dataclass
class ImageRecord:
    """One image and its annotations, as loaded (crowd boxes included, for evaluation).

    Attributes:
        boxes: float32 `[N, 4]` xyxy in pixels of the original (displayed) image, clipped to it.
        category_ids: int64 `[N]` original COCO category ids.
        iscrowd: bool `[N]`.
        ann_ids: int64 `[N]` COCO annotation ids.
    """
    image_id: int
    source: int
    path: str
    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    ann_ids: np.ndarray
    exif: bool = True


@dataclass
class CocoSource:
    """A validated COCO file as flat arrays; annotations of image i are `ann_offsets[i]:[i+1]`.

    Attributes:
        categories: `[{"id": int, "name": str}]` as in the file.
        image_ids, heights, widths: int64 `[I]`.
        file_names: `I` paths relative to `image_dir`.
        ann_offsets: int64 `[I + 1]`.
        boxes: float32 `[A, 4]` xyxy pixels, clipped; category_ids, ann_ids: int64 `[A]`;
        iscrowd: bool `[A]`.
        exif: bool `[I]`: decode image i with its EXIF orientation applied (False where the JSON
            size is the stored, unrotated one: the boxes are in that frame).
        stats: counts of images, annotations, crowd, clipped and dropped boxes, skipped images.
    """
    json_file: str
    image_dir: str
    categories: list[dict]
    image_ids: np.ndarray
    file_names: list[str]
    heights: np.ndarray
    widths: np.ndarray
    ann_offsets: np.ndarray
    boxes: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    ann_ids: np.ndarray
    exif: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def record(self, index: int, source: int = 0) -> ImageRecord:
        """The `ImageRecord` of image `index` (`source` is the caller's index of this source)."""
        a, b = int(self.ann_offsets[index]), int(self.ann_offsets[index + 1])
        return ImageRecord(int(self.image_ids[index]), source,
                           os.path.join(self.image_dir, self.file_names[index]),
                           self.file_names[index], int(self.heights[index]), int(self.widths[index]),
                           self.boxes[a:b], self.category_ids[a:b], self.iscrowd[a:b],
                           self.ann_ids[a:b], bool(self.exif[index]) if len(self.exif) else True)


def _read_json(json_file: str, where: str | None = None) -> dict:
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:  # the spec key says which of several sources to fix
        raise MissingInputError(f"{where + ': ' if where else ''}annotation file {json_file} "
                                "does not exist") from None
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{json_file}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{json_file}: not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{json_file}: the top level must be an object with images, "
                              "annotations and categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{json_file}: '{key}' must be a list")
    if "annotations" not in data:
        warnings.warn(f"{json_file} has no 'annotations' key: all {len(data['images'])} images are "
                      "read as images without objects (negatives)", DataWarning, stacklevel=3)
    elif not isinstance(data["annotations"], list):
        raise CocoFormatError(f"{json_file}: 'annotations' must be a list")
    return data


def _int(value, what: str, json_file: str) -> int:
    # bool is an int in Python, and a float id would not round-trip through pycocotools' dicts.
    if isinstance(value, bool) or not isinstance(value, int):
        raise CocoFormatError(f"{json_file}: {what} must be an integer, got {value!r}")
    return value


def check_file_name(file_name: str, json_file: str, image_id: int) -> str:
    """A file name must be relative and stay inside the image folder (no `..`, no absolute path)."""
    if not isinstance(file_name, str) or not file_name:
        raise CocoFormatError(f"{json_file}: image id {image_id} has no file_name")
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise CocoFormatError(f"{json_file}: image id {image_id} file_name '{file_name}' must be a "
                              "relative path inside image_dir (no '..', not absolute)")
    return file_name


def _categories(data: dict, json_file: str) -> list[dict]:
    """Categories with unique ids and unique names.

    Names are stripped of surrounding white space, the rule the classmap file follows too (one
    name per line), so a name survives the classmap round trip. Two categories with one name
    are an error: the classmap, `color_map` and `category_mapping` key on names.
    """
    categories, seen, names = [], set(), {}
    for cat in data["categories"]:
        if not isinstance(cat, dict) or "id" not in cat:
            raise CocoFormatError(f"{json_file}: category {cat!r} has no id")
        cid = _int(cat["id"], f"category id {cat['id']!r}", json_file)
        if cid < 0:
            raise CocoFormatError(f"{json_file}: category id {cid} is negative; category ids are "
                                  "integers >= 0")
        if cid in seen:
            raise CocoFormatError(f"{json_file}: duplicate category id {cid}")
        seen.add(cid)
        name = str(cat.get("name", cid)).strip()
        if not name or "\n" in name or "\r" in name:
            raise CocoFormatError(f"{json_file}: category id {cid} has name {cat.get('name')!r}; a "
                                  "name must be one non-empty line")
        if name in names:
            raise CocoFormatError(f"{json_file}: categories {names[name]} and {cid} are both named "
                                  f"'{name}'; names must be unique (the classmap and color_map key "
                                  "on them)")
        names[name] = cid
        categories.append({"id": cid, "name": name})
    return categories


def _images(data: dict, json_file: str) -> tuple[list[int], list[str], list, list]:
    ids, names, heights, widths, index = [], [], [], [], {}
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img:
            raise CocoFormatError(f"{json_file}: image entry {img!r} has no id")
        iid = _int(img["id"], f"image id {img['id']!r}", json_file)
        if iid in index:
            raise CocoFormatError(f"{json_file}: duplicate image id {iid}")
        index[iid] = len(ids)
        ids.append(iid)
        names.append(check_file_name(img.get("file_name"), json_file, iid))
        heights.append(img.get("height"))
        widths.append(img.get("width"))
    return ids, names, heights, widths


def load_coco(json_file: str | os.PathLike, image_dir: str | os.PathLike, check_files: bool = True,
              skip_bad_images: bool = False, where: str | None = None) -> CocoSource:
    """Loads and validates one COCO source.

    Args:
        json_file: the COCO annotation file (images, annotations, categories).
        image_dir: the folder the images' `file_name`s are relative to.
        check_files: decode every image now (`codetr.data.image_check`, cached) and compare its
            size with the JSON's; False reads only the headers of images without a JSON size.
        skip_bad_images: drop images that are missing, cannot be decoded or whose size
            contradicts the JSON (with their annotations and a counted warning) instead of failing.
        where: the spec key of `json_file` (`dataset.val_data_sources[0].json_file`), for errors.

    Raises:
        FileNotFoundError: the JSON file or image files are missing (names them).
        ImageDecodeError: images cannot be decoded (names every one).
        CocoFormatError: the content is invalid (names the file and the offending entry), or a
            JSON size contradicts its image file.
    """
    json_file, image_dir = str(json_file), str(image_dir)
    data = _read_json(json_file, where)
    categories = _categories(data, json_file)
    known_categories = {c["id"] for c in categories}
    ids, names, heights, widths = _images(data, json_file)
    if check_files:
        if not skip_bad_images:
            check_files_exist(json_file, image_dir, names)
        keep_image, exif = verify_images(json_file, image_dir, names, heights, widths, skip_bad_images)
    else:
        fill_missing_sizes(image_dir, names, heights, widths)
        keep_image, exif = [True] * len(ids), [True] * len(ids)
    skipped = {iid for iid, k in zip(ids, keep_image) if not k}
    if skipped:
        kept = [i for i, k in enumerate(keep_image) if k]
        ids, names = [ids[i] for i in kept], [names[i] for i in kept]
        heights, widths, exif = [heights[i] for i in kept], [widths[i] for i in kept], [exif[i] for i in kept]
    image_index = {iid: i for i, iid in enumerate(ids)}

    rows, seen_ann = [], set()
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict) or "id" not in ann:
            raise CocoFormatError(f"{json_file}: annotation {str(ann)[:80]} has no id")
        aid = _int(ann["id"], f"annotation id {ann['id']!r}", json_file)
        if aid == 0:
            raise CocoFormatError(f"{json_file}: annotation id 0 is not allowed (pycocotools never "
                                  "matches a detection to annotation id 0); number annotations from 1")
        if aid in seen_ann:
            raise CocoFormatError(f"{json_file}: duplicate annotation id {aid}")
        seen_ann.add(aid)
        if ann.get("image_id") in skipped:
            continue
        img = image_index.get(ann.get("image_id"))
        if img is None:
            raise CocoFormatError(f"{json_file}: annotation id {aid} refers to image id "
                                  f"{ann.get('image_id')!r}, which is not in 'images'")
        cid = ann.get("category_id")
        if cid not in known_categories or isinstance(cid, bool):
            raise CocoFormatError(f"{json_file}: annotation id {aid} has category_id {cid!r}, which "
                                  f"is not in 'categories' (ids {sorted(known_categories)})")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise CocoFormatError(f"{json_file}: annotation id {aid} bbox {bbox!r} must be "
                                  "[x, y, width, height] numbers")
        crowd = ann.get("iscrowd", 0)  # bool("0") is True: a string would drop the box silently
        if not isinstance(crowd, (int, bool)) or crowd not in (0, 1):
            raise CocoFormatError(f"{json_file}: annotation id {aid} has iscrowd {crowd!r}; allowed: "
                                  "0, 1, true, false")
        rows.append((img, aid, cid, bool(crowd), *bbox))

    table = np.asarray(rows, dtype=np.float64).reshape(-1, 8)
    img_idx = table[:, 0].astype(np.int64)
    boxes, keep, n_clipped = clip_boxes(table[:, 4:8], np.asarray(heights, np.float64)[img_idx],
                                        np.asarray(widths, np.float64)[img_idx])
    n_dropped = int((~keep).sum())
    if n_dropped:
        examples = table[~keep, 1].astype(np.int64)[:5].tolist()
        warnings.warn(f"{json_file}: dropped {n_dropped} of {len(table)} annotations whose box is empty "
                      f"or non-finite after clipping to the image (annotation ids {examples}...)",
                      DataWarning, stacklevel=2)
    if n_clipped:
        warnings.warn(f"{json_file}: clipped {n_clipped} boxes that extended outside their image",
                      DataWarning, stacklevel=2)
    table, boxes, img_idx = table[keep], boxes[keep], img_idx[keep]
    order = np.argsort(img_idx, kind="stable")
    counts = np.bincount(img_idx, minlength=len(ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    iscrowd = table[order, 3].astype(bool)
    return CocoSource(
        json_file=json_file, image_dir=image_dir, categories=categories,
        image_ids=np.asarray(ids, dtype=np.int64), file_names=names,
        heights=np.asarray(heights, dtype=np.int64), widths=np.asarray(widths, dtype=np.int64),
        ann_offsets=offsets, boxes=boxes[order].astype(np.float32),
        category_ids=table[order, 2].astype(np.int64), iscrowd=iscrowd,
        ann_ids=table[order, 1].astype(np.int64), exif=np.asarray(exif, dtype=bool),
        stats={"images": len(ids), "annotations": int(len(table)), "crowd": int(iscrowd.sum()),
               "clipped": int(n_clipped), "dropped": n_dropped,
               "negative_images": int((counts == 0).sum()), "skipped_images": len(skipped)})


def clip_boxes(xywh: np.ndarray, heights: np.ndarray, widths: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Clips COCO boxes to their images.

    Args:
        xywh: `[N, 4]` COCO boxes (x, y, w, h) in pixels.
        heights, widths: `[N]` size of each box's image.

    Returns:
        xyxy `[N, 4]` clipped boxes, keep bool `[N]` (False: empty or non-finite after clipping, i.e.
        w or h <= 0 or entirely outside), and the number of kept boxes that clipping changed.
    """
    with np.errstate(invalid="ignore"):
        raw = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        limits = np.stack([widths, heights, widths, heights], axis=1)
        clipped = np.clip(raw, 0.0, limits)
        keep = (np.isfinite(raw).all(axis=1) & (clipped[:, 2] > clipped[:, 0])
                & (clipped[:, 3] > clipped[:, 1]))
    changed = keep & (np.abs(clipped - raw) > 1e-6).any(axis=1)
    return np.where(np.isfinite(clipped), clipped, 0.0), keep, int(changed.sum())
