"""Stage `prepare`: build the data folder (synthetic shapes, or a user's COCO data) and its stats.

`params.yaml` section `prepare`:

    source: synthetic        # synthetic | coco
    inputs: inputs           # the folder holding every file the coco source reads: a dvc.yaml dep
    contiguous_ids: false    # rewrite category ids to 1..K (ascending old id) in every split
    synthetic: {num_train, num_val, num_test, image_size, seed, classes, max_objects, empty_prob}
    coco:                    # used when source is coco
      images: symlink        # symlink | copy | none (none: the spec keeps the original image_dir)
      train: {json_file: ..., image_dir: ...}
      val:   {json_file: ..., image_dir: ...}
      test:  {json_file: ..., image_dir: ...}   # optional; null skips the split
      categories: [person, car]   # optional: keep only these categories (by name) and the
                                  # images that have one of them (`codetr.data.subset`)
      split: {val: 0.25, test: 0.0, seed: 0}   # optional: cut train's file by image into
                                  # train/val/test (then val and test must not be given)

Output folder (`--out`, declared in dvc.yaml), the same layout for both sources:

    classmap.txt                      class names in ascending category id order
    stats.json                        images, boxes, empty images, boxes per class, per split
    <split>/annotations.json          COCO, validated by `codetr.data.coco.load_coco`
    <split>/images/<file_name>        unless coco.images is none

`inputs` is the stage's data dependency (`${prepare.inputs}` in dvc.yaml, expanded by the
Snakefile too): with `source: coco` every `json_file`, and every `image_dir` unless `images: none`,
must lie inside it, so `dvc repro` and `snakemake` rerun `prepare` when the user's data changes
(an absolute folder elsewhere is fine: DVC hashes external dependencies).

The folder is built beside `--out` and renamed into place, so a failed run leaves no half-built
data. With `--check-spec`, the spec's `dataset.num_classes` / `contiguous_labels` are checked
against the categories found (the same `LabelMap` rules the train task applies).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from codetr.data.classmap import write_classmap
from codetr.data.coco import load_coco
from codetr.data.labels import LabelMap
from codetr.data.subset import SubsetError, select_categories, split_by_image
from codetr.data.synthetic import generate
from codetr.fileio import atomic_write_text, replace_dir
from pipeline.param_schema import IMAGE_MODES, require_bool
from pipeline.params import load_params, section

SPLITS = ("train", "val", "test")


class PrepareError(ValueError):
    """The prepare params or the user's data are unusable; the message says which and why."""


def _place_coco_split(split: str, data: dict, image_dir: Path, out: Path, images: str) -> None:
    """Writes one split's COCO dict to `out/<split>/annotations.json` and places its images."""
    (out / split).mkdir(parents=True)
    json_file = out / split / "annotations.json"
    atomic_write_text(json_file, json.dumps(data))
    source = load_coco(json_file, image_dir)  # validates before any image is placed
    if images == "none":
        return
    for name in source.file_names:
        target = out / split / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if images == "symlink":
            os.symlink((image_dir / name).resolve(), target)
        else:
            shutil.copy2(image_dir / name, target)


def _split_paths(coco: dict, split: str) -> tuple[Path, Path]:
    """`prepare.coco.<split>` as (json_file, image_dir); else a PrepareError, not a KeyError."""
    src, needed = coco[split], ("json_file", "image_dir")
    if not isinstance(src, dict):
        raise PrepareError(f"prepare.coco.{split} must be a mapping {{json_file: <COCO file>, "
                           f"image_dir: <image folder>}}, got {src!r}")
    missing = [k for k in needed if not isinstance(src.get(k), str) or not src[k].strip()]
    if missing:
        raise PrepareError(f"prepare.coco.{split} needs json_file and image_dir (paths); "
                           f"{' and '.join(missing)} missing or not a path in {src!r}")
    return Path(src["json_file"]), Path(src["image_dir"])


def _coco_splits(coco: dict) -> Dict[str, tuple]:
    """The `prepare.coco` section as `{split: (coco_dict, image_dir)}`, subsets applied."""
    cut = coco.get("split")
    given = [s for s in SPLITS if coco.get(s)]
    if "train" not in given:
        raise PrepareError("prepare.coco.train {json_file, image_dir} is required")
    if cut is not None and given != ["train"]:
        raise PrepareError(f"prepare.coco.split cuts the train file into splits; remove "
                           f"prepare.coco.{' and prepare.coco.'.join(given[1:])} or the split")
    if cut is not None and not isinstance(cut, dict):
        raise PrepareError(f"prepare.coco.split must be a mapping like {{val: 0.25, test: 0.0, "
                           f"seed: 0}}, got {cut!r}")
    splits = {}
    for s in given:
        json_file, image_dir = _split_paths(coco, s)
        load_coco(json_file, image_dir, where=f"prepare.coco.{s}.json_file")  # the user's file, as given
        data = json.loads(json_file.read_text())
        if coco.get("categories") is not None:
            data = select_categories(data, coco["categories"], where="prepare.coco.categories")
        splits[s] = (data, image_dir)
    if cut is not None:
        fractions = {k: v for k, v in cut.items() if k != "seed"}
        parts = split_by_image(splits["train"][0], fractions, seed=int(cut.get("seed", 0)),
                               where="prepare.coco.split")
        splits = {s: (part, splits["train"][1]) for s, part in parts.items()}
    return splits


def _check_inside_inputs(coco: dict, inputs: str, images: str) -> None:
    """Every file the coco source reads lies under `prepare.inputs` (else no runner sees it change)."""
    root = os.path.abspath(inputs)
    for split in SPLITS:
        for key in ("json_file", "image_dir"):
            if not coco.get(split) or (key == "image_dir" and images == "none"):
                continue
            path = os.path.abspath(str(coco[split].get(key, "")))
            inside = os.path.commonpath([root, path]) == root
            real_root, real = os.path.realpath(root), os.path.realpath(path)
            if inside and os.path.commonpath([real_root, real]) != real_root:
                raise PrepareError(
                    f"prepare.coco.{split}.{key}={coco[split][key]} lies under a symbolic link inside "
                    f"prepare.inputs={inputs} that leads to {real}: DVC and Snakemake do not follow "
                    "links inside a dependency folder, so changes there would go unnoticed. Set "
                    "prepare.inputs to the real folder (a link as prepare.inputs itself is followed)")
            if not inside:
                raise PrepareError(
                    f"prepare.coco.{split}.{key}={coco[split][key]} lies outside prepare.inputs="
                    f"{inputs}: dvc repro and snakemake would not notice when it changes. Set "
                    "prepare.inputs to a folder that holds all of the data (an absolute path "
                    "works), or move the data under it" + ("" if key == "json_file" else
                                                           " (or use coco.images: none)"))


def _remap_contiguous(out: Path, splits: List[str]) -> Dict[int, int]:
    """Rewrites category ids to 1..K in every split's annotations; returns old id -> new id."""
    ids = sorted({c["id"] for s in splits
                  for c in json.loads((out / s / "annotations.json").read_text())["categories"]})
    mapping = {old: new for new, old in enumerate(ids, start=1)}
    for s in splits:
        path = out / s / "annotations.json"
        coco = json.loads(path.read_text())
        for cat in coco["categories"]:
            cat["id"] = mapping[cat["id"]]
        for ann in coco.get("annotations", []):
            ann["category_id"] = mapping[ann["category_id"]]
        atomic_write_text(path, json.dumps(coco))
    return mapping


def _split_stats(out: Path, split: str, image_dir: Path) -> tuple[dict, list]:
    """Validates a split with `load_coco` and counts images, boxes and boxes per class."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = load_coco(out / split / "annotations.json", image_dir)
    for w in caught:
        print(f"prepare: {split}: {w.message}", file=sys.stderr)
    names = {c["id"]: c["name"] for c in source.categories}
    counts = np.bincount(source.category_ids, minlength=max(names, default=0) + 1)
    per_image = np.diff(source.ann_offsets)
    stats = {"images": len(source), "boxes": int(len(source.category_ids)),
             "empty_images": int((per_image == 0).sum()), "crowd": int(source.iscrowd.sum()),
             "boxes_per_class": {names[c]: int(counts[c]) for c in sorted(names)}}
    return stats, sorted(source.categories, key=lambda c: c["id"])


def run(params: dict, out_dir: str | Path) -> dict:
    """Builds `out_dir` from the `prepare` params section (see the module docstring).

    Returns:
        The stats written to `out_dir/stats.json`.

    Raises:
        PrepareError: bad params or inconsistent categories across splits.
        CocoFormatError, FileNotFoundError: from `codetr.data.coco.load_coco` on a user's data.
    """
    out_dir = Path(out_dir)
    kind = params.get("source", "synthetic")
    remap = require_bool(params.get("contiguous_ids", False), "prepare.contiguous_ids", PrepareError)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        image_dirs: Dict[str, Path] = {}
        if kind == "synthetic":
            syn = dict(params.get("synthetic") or {})
            if "classes" in syn:
                syn["classes"] = tuple(syn["classes"])
            try:
                generate(tmp, **syn)
            except TypeError as err:
                raise PrepareError(f"prepare.synthetic: {err}") from None
            splits = [s for s in SPLITS if json.loads((tmp / s / "annotations.json").read_text())["images"]]
            image_dirs = {s: tmp / s / "images" for s in SPLITS}
        elif kind == "coco":
            coco = params.get("coco") or {}
            if not isinstance(coco, dict):
                raise PrepareError(f"prepare.coco must be a mapping with train, val, test, got {coco!r}")
            images = coco.get("images", "symlink")
            if images not in IMAGE_MODES:
                raise PrepareError(f"prepare.coco.images must be one of {IMAGE_MODES}, got {images!r}")
            for s in SPLITS:  # bad entries fail here, before _check_inside_inputs reads them
                if coco.get(s):
                    _split_paths(coco, s)
            if params.get("inputs") is not None:  # the pipeline's params always give it
                _check_inside_inputs(coco, str(params["inputs"]), images)
            try:
                placed = _coco_splits(coco)
            except SubsetError as err:
                raise PrepareError(str(err)) from None
            splits = [s for s in SPLITS if s in placed]
            for s in splits:
                data, image_dir = placed[s]
                _place_coco_split(s, data, image_dir, tmp, images)
                image_dirs[s] = tmp / s / "images" if images != "none" else image_dir
        else:
            raise PrepareError(f"prepare.source must be synthetic or coco, got {kind!r}")
        if remap:
            _remap_contiguous(tmp, splits)
        stats: dict = {"source": kind, "splits": {}}
        categories = None
        for s in splits:
            stats["splits"][s], cats = _split_stats(tmp, s, image_dirs[s])
            if categories is not None and cats != categories:
                raise PrepareError(f"split {s} has categories {cats}, but {splits[0]} has "
                                   f"{categories}; all splits must share one category list")
            categories = cats
        stats["categories"] = categories
        write_classmap(tmp / "classmap.txt", [c["name"] for c in categories])
        atomic_write_text(tmp / "stats.json", json.dumps(stats, indent=2) + "\n")
        replace_dir(tmp, out_dir)  # the old data/ stays whole until the new one is in place
        # the temporary folder was private (0700): give the data folder the usual permissions
        out_dir.chmod(0o755)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def check_spec(stats: dict, dataset: dict) -> None:
    """Checks the spec's `dataset.num_classes` and `contiguous_labels` against the categories.

    Raises:
        SpecError: with the value to set (from `LabelMap`).
    """
    contiguous = require_bool(dataset.get("contiguous_labels", False), "dataset.contiguous_labels", PrepareError)
    LabelMap.from_categories(stats["categories"], int(dataset.get("num_classes", 91)), contiguous)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file with a `prepare` section")
    parser.add_argument("--out", required=True, help="output folder (declared in dvc.yaml)")
    parser.add_argument("--check-spec", action="store_true",
                        help="check dataset.num_classes/contiguous_labels of the same params file")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    try:
        stats = run(section(params, "prepare"), args.out)
        if args.check_spec:
            check_spec(stats, section(params, "dataset"))
    except (ValueError, FileNotFoundError) as err:  # PrepareError, CocoFormatError, SpecError
        print(f"prepare: error: {err}", file=sys.stderr)
        return 1
    for split, s in stats["splits"].items():
        print(f"prepare: {split}: {s['images']} images, {s['boxes']} boxes, "
              f"{s['empty_images']} without objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
