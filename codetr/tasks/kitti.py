"""KITTI label files (TAO's inference output) and safe output paths for them.

One line per detection, 16 fields separated by single spaces:

    name 0.00 0 0.00 x1 y1 x2 y2 0.00 0.00 0.00 0.00 0.00 0.00 0.00 score

(type, truncated, occluded, alpha, bbox xyxy in pixels of the original image, 3-D dimensions,
location and rotation_y unused, then the confidence). KITTI splits on whitespace, so a class
name containing spaces is written with underscores (`traffic light` -> `traffic_light`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, List, Sequence

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]+")


def kitti_name(name: str) -> str:
    """A class name as one KITTI token: whitespace runs become underscores."""
    token = re.sub(r"\s+", "_", name.strip())
    return token or "unnamed"


def format_kitti_line(name: str, box_xyxy: Sequence[float], score: float) -> str:
    """One KITTI line; `box_xyxy` is (x1, y1, x2, y2) in original-image pixels."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return (f"{kitti_name(name)} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} "
            f"0.00 0.00 0.00 0.00 0.00 0.00 0.00 {float(score):.4f}")


@dataclass
class KittiObject:
    """A parsed KITTI line (the fields inference fills)."""
    name: str
    box_xyxy: tuple
    score: float


def parse_kitti_line(line: str) -> KittiObject:
    """Inverse of `format_kitti_line`; raises ValueError on a malformed line."""
    fields = line.split()
    if len(fields) != 16:
        raise ValueError(f"a KITTI line has 16 fields, got {len(fields)}: {line!r}")
    return KittiObject(name=fields[0], box_xyxy=tuple(float(v) for v in fields[4:8]),
                       score=float(fields[15]))


def kitti_text(lines: Iterable[str]) -> str:
    """File content: the lines, newline-terminated (an empty file for no detection)."""
    lines = list(lines)
    return "".join(line + "\n" for line in lines)


def safe_relative_path(image_path: Path, root: Path, suffix: str, prefix: Sequence[str] = ()) -> PurePath:
    """The output path, relative to an output folder, of an image found under `root`.

    The image's path relative to `root` keeps its folders; every component is reduced to
    `[A-Za-z0-9._-]` and `.`/`..` components are neutralised, so no image name (`../x.jpg`,
    absolute-looking names, spaces, unicode) can make an output escape the output folder.

    Args:
        image_path: the image file (under `root`).
        root: the folder that was searched.
        suffix: the output extension, e.g. '.txt'.
        prefix: extra leading components (e.g. an index per input folder) to keep several
            roots apart.
    """
    try:  # lexical: resolving symlinks could move the image "outside" its root
        rel = PurePath(image_path).relative_to(PurePath(root))
    except ValueError:
        rel = PurePath(PurePath(image_path).name)
    parts: List[str] = [_clean(p) for p in prefix]
    parents = rel.parts[:-1]
    parts += [_clean(p) for p in parents]
    parts.append(_clean(PurePath(rel.name).stem if rel.name else "_") + suffix)
    return PurePath(*parts)


def _clean(component: str) -> str:
    cleaned = _UNSAFE.sub("_", component)
    # '.', '..' and names made only of dots would walk up or vanish.
    if set(cleaned) <= {"."}:
        cleaned = cleaned.replace(".", "_") or "_"
    return cleaned
