"""Small COCO datasets written with PIL for the data tests (random content, fixed seeds)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Random RGB noise (never constant, so pixel checks can fail)."""
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_boxes(rng: np.random.Generator, height: int, width: int, n: int) -> list[list[float]]:
    """`n` valid COCO xywh boxes inside a (height, width) image."""
    boxes = []
    for _ in range(n):
        w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)])
    return boxes


def make_coco(root: Path, n_images: int = 4, seed: int = 0, first_image_id: int = 1,
              first_ann_id: int = 1, sizes: Optional[list[tuple[int, int]]] = None,
              boxes_per_image: Optional[list[int]] = None, categories: Optional[list[dict]] = None,
              name: str = "instances.json") -> tuple[Path, Path]:
    """Writes `root/images/*.png` and `root/<name>`; returns (json_file, image_dir).

    Image i has size `sizes[i]` (default random 40..90 px) and `boxes_per_image[i]` boxes (default
    1..4, the last image has none: a negative), category ids from `categories` (ids with gaps).
    """
    rng = np.random.default_rng(seed)
    categories = categories or CATEGORIES
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for i in range(n_images):
        h, w = sizes[i] if sizes else (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        file_name = f"img_{seed}_{i}.png"
        random_image(rng, h, w).save(image_dir / file_name)
        image_id = first_image_id + i
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        n = boxes_per_image[i] if boxes_per_image else (int(rng.integers(1, 5)) if i < n_images - 1 else 0)
        for box in random_boxes(rng, h, w, n):
            cat = categories[int(rng.integers(0, len(categories)))]["id"]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
            ann_id += 1
    json_file = root / name
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": categories}, indent=1))
    return json_file, image_dir


def edit_coco(json_file: Path, **changes) -> dict:
    """Reads the fixture JSON, replaces top-level keys, writes it back; returns the new content."""
    data = json.loads(json_file.read_text())
    data.update(changes)
    json_file.write_text(json.dumps(data, indent=1))
    return data
