"""Up-front decoding of every image of a data set: a bad file fails before the first step.

A truncated, zero-byte or random-bytes image would otherwise fail mid-epoch (a bad validation image
costs a whole epoch and leaves no checkpoint). `check_images` opens each file, reads its header
(size, EXIF orientation) and decodes it completely but cheaply (JPEGs at 1/8 scale through the
DCT draft mode, which still runs the whole entropy-coded stream), in a thread pool: Pillow
releases the GIL while it decodes.

Results are cached per file, keyed on (size, mtime), in `$CODETR_CACHE_DIR` (default
`~/.cache/codetr`) as JSON, so a second run over the same files only stats them.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, UnidentifiedImageError

from codetr.data.errors import CocoFormatError, DataWarning
from codetr.data.images import ImageDecodeError, displayed_size
from codetr.errors import MissingInputError
from codetr.fileio import atomic_write_text

CACHE_VERSION = 1
# EXIF orientations 5..8 rotate by 90 degrees: the displayed width and height are swapped.
_ROTATING = (5, 6, 7, 8)


@dataclass(frozen=True)
class ImageInfo:
    """What decoding one image found.

    Attributes:
        height, width: the size as stored in the file (before EXIF orientation), 0 when unreadable.
        orientation: the EXIF orientation tag (1: none).
        error: why the file cannot be decoded; None when it decodes.
    """
    height: int
    width: int
    orientation: int = 1
    error: Optional[str] = None

    @property
    def displayed(self) -> tuple[int, int]:
        """(height, width) as displayed, EXIF orientation applied (what `load_rgb` returns)."""
        return (self.width, self.height) if self.orientation in _ROTATING else (self.height, self.width)


def inspect_image(path: str) -> ImageInfo:
    """Header + a cheap full decode of one file (never raises for a bad file)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            try:
                orientation = int(image.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels may still be fine
                orientation = 1
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except FileNotFoundError:
        return ImageInfo(0, 0, error="file does not exist")
    except Image.DecompressionBombError as err:
        return ImageInfo(0, 0, error=f"too large to decode safely ({err})")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        return ImageInfo(0, 0, error=str(err) or type(err).__name__)
    return ImageInfo(int(height), int(width), orientation)


def _cache_file(image_dir: str) -> Optional[Path]:
    root = os.environ.get("CODETR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "codetr")
    if not root:
        return None
    key = hashlib.sha1(os.path.abspath(image_dir).encode("utf-8")).hexdigest()[:16]
    return Path(root) / "image_check" / f"{key}.json"


def _read_cache(path: Optional[Path]) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache is rebuilt, never trusted
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("files")
    return entries if isinstance(entries, dict) else {}


def _stamp(path: str) -> Optional[list[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def check_images(image_dir: str, file_names: Sequence[str], workers: Optional[int] = None,
                 use_cache: bool = True) -> list[ImageInfo]:
    """Decodes every `image_dir/file_name`; one `ImageInfo` per name, in order.

    Args:
        image_dir: the folder the names are relative to (also the cache key).
        file_names: relative paths.
        workers: decoding threads (default: CPU count, at most 8).
        use_cache: reuse and update the per-folder cache.
    """
    cache_path = _cache_file(image_dir) if use_cache else None
    cached = _read_cache(cache_path)
    paths = [os.path.join(image_dir, n) for n in file_names]
    stamps = [_stamp(p) for p in paths]
    results: list[Optional[ImageInfo]] = [None] * len(paths)
    todo = []
    for i, (name, stamp) in enumerate(zip(file_names, stamps)):
        hit = cached.get(name)
        if stamp is not None and isinstance(hit, dict) and hit.get("stamp") == stamp:
            try:
                results[i] = ImageInfo(**hit["info"])
                continue
            except (TypeError, KeyError):
                pass
        todo.append(i)
    if todo:
        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, info in zip(todo, pool.map(inspect_image, [paths[i] for i in todo])):
                results[i] = info
        if cache_path is not None:
            entries = dict(cached)
            for i in todo:
                if stamps[i] is not None:
                    entries[file_names[i]] = {"stamp": stamps[i], "info": asdict(results[i])}
            try:
                atomic_write_text(cache_path, json.dumps({"version": CACHE_VERSION, "files": entries}))
            except OSError as err:  # a read-only home: checking still works, only slower
                warnings.warn(f"cannot write the image check cache {cache_path}: {err}", stacklevel=2)
    return [r for r in results if r is not None]


def _valid_size(h, w) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (h, w))


def check_files_exist(json_file: str, image_dir: str, names: list[str]) -> None:
    """Raises MissingInputError naming a few of the image files that do not exist."""
    missing = [n for n in names if not os.path.isfile(os.path.join(image_dir, n))]
    if missing:
        shown = ", ".join(os.path.join(image_dir, n) for n in missing[:3])
        raise MissingInputError(f"{len(missing)} of {len(names)} image files listed in {json_file} "
                                f"are missing, e.g. {shown}")


def fill_missing_sizes(image_dir: str, names: list[str], heights: list, widths: list) -> None:
    """Reads the header of images whose JSON entry lacks a valid width/height."""
    for i, (h, w) in enumerate(zip(heights, widths)):
        if not _valid_size(h, w):
            heights[i], widths[i] = displayed_size(os.path.join(image_dir, names[i]))


def _listing(problems: Sequence[str], limit: int = 10) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "".join(f"\n  {p}" for p in problems[:limit]) + more


def verify_images(json_file: str, image_dir: str, file_names: Sequence[str], heights: list,
                  widths: list, skip_bad: bool) -> tuple[list[bool], list[bool]]:
    """Decodes the images of a COCO file and reconciles their sizes with the JSON's.

    The boxes of a COCO file are in the frame of its `width` x `height`. Like OpenCV, mmdet and
    detectron2 we decode in the displayed orientation (EXIF applied), so that is the size the
    JSON should give. A JSON size equal to the STORED size of a 90-degree EXIF image means the
    annotation tool ignored EXIF: that image is decoded without rotation so its boxes fit (warned,
    counted). A JSON size matching neither is an error naming the image. Missing sizes are filled.

    Args:
        json_file: for messages.
        image_dir, file_names: the images.
        heights, widths: the JSON sizes per image (None/invalid: unknown); filled in place.
        skip_bad: drop undecodable and size-contradicting images (a counted warning) instead of
            raising.

    Returns:
        (keep [I], apply_exif [I]).

    Raises:
        ImageDecodeError: images cannot be decoded (each named), unless `skip_bad`.
        CocoFormatError: JSON sizes contradict the files (each named), unless `skip_bad`.
    """
    infos = check_images(image_dir, file_names)
    keep, exif = [True] * len(infos), [True] * len(infos)
    broken, mismatched, stored_frame = [], [], []
    for i, (name, info) in enumerate(zip(file_names, infos)):
        path = os.path.join(image_dir, name)
        if info.error is not None:
            broken.append(f"{path}: {info.error}")
            keep[i] = False
            continue
        if not _valid_size(heights[i], widths[i]):
            heights[i], widths[i] = info.displayed
            continue
        size = (int(heights[i]), int(widths[i]))
        if size == info.displayed:
            continue
        if size == (info.height, info.width):  # orientation 5..8 and the JSON kept the stored size
            exif[i] = False
            stored_frame.append(name)
            continue
        mismatched.append(f"{path}: the JSON says {size[1]}x{size[0]} (w x h), the file is "
                          f"{info.displayed[1]}x{info.displayed[0]}"
                          + (f" (EXIF orientation {info.orientation})" if info.orientation != 1 else ""))
        keep[i] = False
    hint = "; or set dataset.skip_bad_images: true to train without them"
    if broken and not skip_bad:
        raise ImageDecodeError(f"{len(broken)} of {len(infos)} images listed in {json_file} cannot be "
                               f"decoded (fix or remove them{hint}):{_listing(broken)}")
    if mismatched and not skip_bad:
        raise CocoFormatError(f"{json_file}: {len(mismatched)} images have a width/height that does "
                              "not match the image file, so their boxes cannot be placed (fix the "
                              f"sizes in the JSON{hint}):{_listing(mismatched)}")
    if broken or mismatched:
        warnings.warn(f"{json_file}: skipped {len(broken) + len(mismatched)} of {len(infos)} images "
                      f"(dataset.skip_bad_images): {len(broken)} undecodable, {len(mismatched)} with a "
                      f"size that contradicts the JSON:{_listing(broken + mismatched, 5)}",
                      DataWarning, stacklevel=3)
    if stored_frame:
        warnings.warn(f"{json_file}: {len(stored_frame)} images carry an EXIF rotation but the JSON "
                      "gives their stored (unrotated) size: their boxes are read in the stored frame "
                      f"and the images decoded without rotation, e.g. {', '.join(stored_frame[:5])}",
                      DataWarning, stacklevel=3)
    return keep, exif
