"""Memory of forked dataloader workers reading annotations: `default` vs `serialized` stores.

A fake annotation set (no images: only annotation access is measured) is packed into each store in
a fresh process, which then forks `--workers` workers (as a DataLoader with the fork start method
does). Every worker reads every record once, as workers do over a few shuffled epochs; then, while
all are still alive, each reports its memory from /proc/self/smaps_rollup:
USS (Private_Clean + Private_Dirty: pages that are this worker's alone, i.e. copied) and PSS
(shared pages divided among their sharers; summing PSS over the processes gives the real total).

    .venv/bin/python bench/data_memory.py --annotations 200000 --workers 4
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codetr.data.coco import CocoSource  # noqa: E402
from codetr.data.dataset import build_store  # noqa: E402


def fake_source(num_annotations: int, per_image: int, seed: int = 0) -> CocoSource:
    """A COCO-like source: `num_annotations / per_image` images with random boxes and names."""
    rng = np.random.default_rng(seed)
    num_images = num_annotations // per_image
    counts = rng.multinomial(num_annotations, np.full(num_images, 1 / num_images))
    xy = rng.uniform(0, 500, (num_annotations, 2)).astype(np.float32)
    wh = rng.uniform(1, 100, (num_annotations, 2)).astype(np.float32)
    return CocoSource(
        json_file="fake.json", image_dir="/data/fake/train2017", categories=[{"id": 1, "name": "a"}],
        image_ids=np.arange(1, num_images + 1, dtype=np.int64),
        file_names=[f"{i:012d}.jpg" for i in range(1, num_images + 1)],
        heights=np.full(num_images, 640, np.int64), widths=np.full(num_images, 640, np.int64),
        ann_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=np.concatenate([xy, xy + wh], 1), category_ids=rng.integers(1, 91, num_annotations),
        iscrowd=np.zeros(num_annotations, bool), ann_ids=np.arange(1, num_annotations + 1))


def memory_kib() -> dict[str, int]:
    """Rss, Pss and USS of this process in KiB (from smaps_rollup)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def worker(store, touch: bool, barrier, queue) -> None:
    """Reads every record (or none, for the baseline), then reports memory while all are alive."""
    total = 0.0
    if touch:
        for i in range(len(store)):
            record = store.get(i)
            total += float(record.boxes.sum()) + len(record.file_name)
    barrier.wait()
    queue.put(memory_kib())
    barrier.wait()


def run_store(dataset_type: str, num_annotations: int, per_image: int, workers: int, touch: bool,
              queue) -> None:
    """In a fresh process: build the store, fork the workers, collect their memory."""
    source = fake_source(num_annotations, per_image)
    store = build_store([source], dataset_type)
    del source
    gc.collect()
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=worker, args=(store, touch, barrier, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    barrier.wait()  # every worker has read everything
    parent = memory_kib()
    seconds = time.perf_counter() - start
    reports = [results.get() for _ in range(workers)]
    barrier.wait()
    for p in procs:
        p.join()
    queue.put({"type": dataset_type, "touch": touch, "parent": parent, "workers": reports,
               "seconds": seconds})


def measure(dataset_type: str, num_annotations: int, per_image: int, workers: int, touch: bool) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_store,
                       args=(dataset_type, num_annotations, per_image, workers, touch, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=200_000)
    parser.add_argument("--per-image", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    mib = 1 / 1024
    print(f"{args.annotations} annotations, {args.annotations // args.per_image} images, "
          f"{args.workers} forked workers; memory in MiB\n")
    print("| dataset_type | workers read | parent RSS | sum worker USS | sum PSS (parent + workers) "
          "| per-worker USS | read time s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dataset_type in ("default", "serialized"):
        for touch in (False, True):
            r = measure(dataset_type, args.annotations, args.per_image, args.workers, touch)
            uss = [w["uss"] for w in r["workers"]]
            pss = r["parent"]["pss"] + sum(w["pss"] for w in r["workers"])
            print(f"| {dataset_type} | {'all records' if touch else 'nothing'} | "
                  f"{r['parent']['rss'] * mib:.0f} | {sum(uss) * mib:.0f} | {pss * mib:.0f} | "
                  f"{np.mean(uss) * mib:.0f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
