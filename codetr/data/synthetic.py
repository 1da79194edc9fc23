"""A seeded synthetic COCO-format detection dataset: coloured shapes on textured backgrounds.

The default dataset of the pipeline (`prepare` stage): small enough to train a tiny Co-DETR on a
CPU in minutes, hard enough that mAP means something. Each image has a textured background
(noise, gradient or stripes), distractor lines and dots, and 0..`max_objects` shapes of random
colour, size (from ~`min_size` px to ~half the image), aspect ratio and rotation. Later shapes
are drawn over earlier ones; a shape is only placed if every earlier shape keeps at least
`min_visible` of its pixels, and each box is the bounding box of the VISIBLE pixels, so a partly
occluded shape is annotated where it can be seen.

Layout written by `generate` (COCO boxes are `xywh` in absolute pixels, ids start at 1):

    out_dir/classmap.txt                 one class name per line, ascending category id
    out_dir/{train,val,test}/images/*.jpg
    out_dir/{train,val,test}/annotations.json   (`file_name` relative to `images/`)

Category ids are deliberately NOT contiguous (3, 7, 11, 20, ...) so that label mapping bugs
show up. Output is bit-identical for the same arguments: every image draws from its own
generator seeded by (seed, split, index).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from codetr.data.classmap import write_classmap
from codetr.fileio import atomic_write_text

# The catalogue of shapes: name -> category id (non-contiguous on purpose).
SHAPE_IDS: Dict[str, int] = {
    "circle": 3, "square": 7, "triangle": 11, "cross": 20, "ring": 24, "star": 31,
}
DEFAULT_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
SPLITS: Tuple[str, ...] = ("train", "val", "test")


def categories(classes: Sequence[str] = DEFAULT_CLASSES) -> List[dict]:
    """COCO `categories` entries for `classes`, sorted by category id."""
    unknown = [c for c in classes if c not in SHAPE_IDS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {sorted(SHAPE_IDS)}, got {list(classes)}")
    return [{"id": SHAPE_IDS[c], "name": c, "supercategory": "shape"}
            for c in sorted(classes, key=SHAPE_IDS.__getitem__)]


def _polygon(name: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> List[tuple]:
    """Vertices (x, y) in pixels of a polygonal shape of half-extents rx, ry, rotated by angle."""
    if name == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif name == "triangle":
        pts = [(0, -1), (1, 0.8), (-1, 0.8)]
    elif name == "cross":
        t = 0.33  # arm half-width relative to the half-extent
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t),
               (-1, t), (-1, -t), (-t, -t)]
    elif name == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5),
                -(1.0 if k % 2 == 0 else 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
    else:
        raise ValueError(name)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x * rx - s * y * ry, cy + s * x * rx + c * y * ry) for x, y in pts]


def _shape_mask(name: str, size: Tuple[int, int], cx: float, cy: float, rx: float, ry: float,
                angle: float) -> np.ndarray:
    """Bool mask `[H, W]` of one shape (size is (w, h))."""
    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse([cx - rx * 0.55, cy - ry * 0.55, cx + rx * 0.55, cy + ry * 0.55], fill=0)
    else:
        draw.polygon(_polygon(name, cx, cy, rx, ry, angle), fill=255)
    return np.asarray(img) > 127


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float `[H, W, 3]` in 0..255: noise, a linear gradient or sine stripes, plus pixel noise."""
    kind = rng.integers(3)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # blotchy noise: coarse random field upsampled
        coarse = rng.uniform(0, 1, (max(2, h // 16), max(2, w // 16), 1)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse[..., 0] * 255).astype(np.uint8)).resize(
            (w, h), Image.BILINEAR), np.float32)[..., None] / 255.0
    elif kind == 1:  # gradient along a random direction
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a))
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
    else:  # stripes of random period and direction
        a = rng.uniform(0, math.pi)
        period = rng.uniform(4, max(8.0, w / 4))
        t = (0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period))[..., None]
    c0, c1 = c0.astype(np.float32), c1.astype(np.float32)
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(2, 14))
    return c0 + (c1 - c0) * t + noise


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> Tuple[int, int, int]:
    """A random colour at least some distance from `avoid` (the local background mean, [3])."""
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - avoid) > 90:
            break
    return tuple(int(v) for v in c)


def _clutter(rng: np.random.Generator, img: Image.Image, scale: float) -> None:
    """Distractor lines and dots (not annotated) drawn under the shapes."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(0, 5))):
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        draw.line(pts, fill=colour, width=max(1, int(round(rng.uniform(1, 2.5) * scale))))
    for _ in range(int(rng.integers(0, 6))):
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        r = rng.uniform(0.5, 2.0) * scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))


def render_image(rng: np.random.Generator, image_size: int, classes: Sequence[str],
                 max_objects: int, empty_prob: float, min_size: float,
                 min_visible: float) -> Tuple[Image.Image, List[dict]]:
    """Draws one image (arguments as in `generate`; `rng` is the image's own generator).

    Returns:
        The RGB image (image_size x image_size) and its objects as dicts with `name` and
        `bbox` (`xywh` absolute pixels of the visible part, floats).
    """
    h = w = image_size
    scale = image_size / 128.0
    bg = _background(rng, h, w)
    img = Image.fromarray(np.clip(bg, 0, 255, out=bg).astype(np.uint8))
    _clutter(rng, img, scale)
    owner = np.full((h, w), -1, np.int32)  # index of the object that owns each visible pixel
    full_area: List[int] = []
    objects: List[dict] = []
    n = 0 if rng.uniform() < empty_prob else int(rng.integers(1, max_objects + 1))
    for _ in range(n):
        name = classes[int(rng.integers(len(classes)))]
        for _attempt in range(10):
            # log-uniform size: small objects are as common as large ones
            r = math.exp(rng.uniform(math.log(min_size * scale / 2), math.log(image_size * 0.25)))
            aspect = math.exp(rng.uniform(-0.3, 0.3))
            rx, ry = r * aspect, r / aspect
            angle = float(rng.uniform(-0.5, 0.5)) if name != "square" else float(rng.uniform(-0.3, 0.3))
            # the rotated extent fits in 1.42 * max(rx, ry): keep the shape inside the image
            m = 1.42 * max(rx, ry) if name not in ("circle", "ring") else 0.0
            ex, ey = max(rx, m), max(ry, m)
            if 2 * ex >= w - 2 or 2 * ey >= h - 2:
                continue
            cx, cy = rng.uniform(ex + 1, w - ex - 1), rng.uniform(ey + 1, h - ey - 1)
            mask = _shape_mask(name, (w, h), cx, cy, rx, ry, angle)
            area = int(mask.sum())
            if area < 12:
                continue
            covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(objects))
            visible = np.bincount(owner[owner >= 0], minlength=len(objects))
            if np.all(visible - covered >= min_visible * np.asarray(full_area, np.int64)):
                break
        else:
            continue  # no placement keeps the earlier objects visible enough: skip this one
        bg_mean = np.asarray(img, np.float32)[mask].mean(axis=0)
        colour = _colour(rng, bg_mean)
        img.paste(colour, mask=Image.fromarray(mask.astype(np.uint8) * 255))
        owner[mask] = len(objects)
        full_area.append(area)
        objects.append({"name": name})
    for k, obj in enumerate(objects):
        ys, xs = np.nonzero(owner == k)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        obj["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    return img, objects


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def generate_split(out_dir: str | Path, split: str, num_images: int, image_size: int = 128,
                   seed: int = 0, classes: Sequence[str] = DEFAULT_CLASSES, max_objects: int = 6,
                   empty_prob: float = 0.05, min_size: float = 8.0, min_visible: float = 0.5) -> dict:
    """Writes `out_dir/<split>/images/*.jpg` and `out_dir/<split>/annotations.json`.

    Returns:
        The COCO dict that was written.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cats = categories(classes)
    ids = {c["name"]: c["id"] for c in cats}
    split_dir = Path(out_dir) / split
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        img, objects = render_image(rng, image_size, classes, max_objects, empty_prob, min_size,
                                    min_visible)
        file_name = f"{split}_{i:06d}.jpg"
        # plain writes: an fsync per image costs more than the drawing; the annotation file,
        # written last and atomically, is what marks a split complete
        (split_dir / "images" / file_name).write_bytes(_jpeg(img))
        images.append({"id": i + 1, "file_name": file_name, "width": image_size,
                       "height": image_size})
        for obj in objects:
            x, y, bw, bh = obj["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": ids[obj["name"]], "bbox": obj["bbox"],
                                "area": bw * bh, "iscrowd": 0})
    coco = {"info": {"description": f"codetr synthetic shapes, split {split}, seed {seed}"},
            "images": images, "annotations": annotations, "categories": cats}
    atomic_write_text(split_dir / "annotations.json", json.dumps(coco))
    return coco


def generate(out_dir: str | Path, num_train: int = 1000, num_val: int = 200, num_test: int = 100,
             image_size: int = 128, seed: int = 0, classes: Sequence[str] = DEFAULT_CLASSES,
             max_objects: int = 6, empty_prob: float = 0.05, min_size: float = 8.0,
             min_visible: float = 0.5) -> Dict[str, dict]:
    """Writes the three splits and `out_dir/classmap.txt`.

    Args:
        out_dir: output folder (created).
        num_train, num_val, num_test: images per split (0 writes an empty split).
        image_size: side of the square images in pixels.
        seed: the only source of randomness; same arguments -> bit-identical files.
        classes: shape names from `SHAPE_IDS`.
        max_objects: objects per non-empty image are uniform in 1..max_objects (some may be
            skipped when they cannot be placed without hiding earlier ones).
        empty_prob: probability that an image has no object.
        min_size: smallest object extent in pixels at 128 px (scaled with image_size).
        min_visible: fraction of its pixels every object keeps visible.

    Returns:
        split name -> the COCO dict written for it.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if max_objects < 1 or not 0.0 <= empty_prob <= 1.0 or not 0.0 <= min_visible <= 1.0:
        raise ValueError("need max_objects >= 1 and empty_prob, min_visible in [0, 1]")
    out_dir = Path(out_dir)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    result = {split: generate_split(out_dir, split, n, image_size, seed, classes, max_objects,
                                    empty_prob, min_size, min_visible)
              for split, n in counts.items()}
    write_classmap(out_dir / "classmap.txt", [c["name"] for c in categories(classes)])
    return result
