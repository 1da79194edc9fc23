"""Cost of the up-front image check (codetr/data/image_check.py) against a full decode.

    python bench/image_check.py [--images DIR --json FILE]

Default data: ../shared/data/coco128 (128 real COCO JPEGs). Prints the first (uncached) check
inside `load_coco`, the cached rerun, the check alone with 1 and 2 threads, and the full RGB
decode that training does per image (`load_rgb`), all in one process, one after the other.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(shared / "images"))
    parser.add_argument("--json", default=str(shared / "annotations" / "instances.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["CODETR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_image_check_")
    from codetr.data.coco import load_coco
    from codetr.data.image_check import check_images
    from codetr.data.images import load_rgb

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    src, first = timed(lambda: load_coco(args.json, args.images))
    _, cached = timed(lambda: load_coco(args.json, args.images))
    _, one = timed(lambda: check_images(args.images, src.file_names, workers=1, use_cache=False))
    _, two = timed(lambda: check_images(args.images, src.file_names, workers=2, use_cache=False))
    _, full = timed(lambda: [load_rgb(os.path.join(args.images, n)) for n in src.file_names])
    print("| images | load_coco, first | load_coco, cached | check, 1 thread | check, 2 threads | full decode (load_rgb) | full / check |")
    print(f"| {len(src)} | {first:.2f} s | {cached:.3f} s | {one:.2f} s | {two:.2f} s | {full:.2f} s | {full / one:.1f}x |")


if __name__ == "__main__":
    main()
