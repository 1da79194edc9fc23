"""KITTI label files (TAO's inference output).

One line per detection, 16 fields separated by single spaces:

    name 0.00 0 0.00 x1 y1 x2 y2 0.00 0.00 0.00 0.00 0.00 0.00 0.00 score

(type, truncated, occluded, alpha, bbox xyxy in pixels of the original image, 3-D dimensions,
location and rotation_y unused, then the confidence). Box coordinates and score are written with
3 decimals, as TAO's DETR-family inference writer (`save_inference_prediction`: `{:.3f}`).
KITTI splits on whitespace, so a class name containing spaces is written with underscores
(`traffic light` -> `traffic_light`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

def kitti_name(name: str) -> str:
    """A class name as one KITTI token: whitespace runs become underscores."""
    token = re.sub(r"\s+", "_", name.strip())
    return token or "unnamed"


def format_kitti_line(name: str, box_xyxy: Sequence[float], score: float) -> str:
    """One KITTI line; `box_xyxy` is (x1, y1, x2, y2) in original-image pixels."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return (f"{kitti_name(name)} 0.00 0 0.00 {x1:.3f} {y1:.3f} {x2:.3f} {y2:.3f} "
            f"0.00 0.00 0.00 0.00 0.00 0.00 0.00 {float(score):.3f}")


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
