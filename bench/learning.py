"""Does our Co-DETR learn faster than the HF transformers peer? AP against training time.

Three detectors train, each in a fresh process (so each one's peak RSS is its own), one after the
other or side by side with `--parallel` (each then gets the same share of the machine), on the
repo's default synthetic shapes data (or a real COCO set, below), with the same image size,
backbone and pretrained trunk, width, batch, optimizer groups, learning rates, clipping and
training-time budget:

- `ours`: the default Co-DETR of `params.yaml` (model, dataset and optim sections), data paths
  pointed at the bench's generated data;
- `ours_no_co`: the same with `model.num_co_heads=0` (what the collaborative heads buy);
- `ours_rcnn`: the same with `model.use_rcnn_co_head=true` (the full Co-DINO: Faster R-CNN
  co-head beside the ATSS heads; what the R-CNN head buys on top of ATSS);
- `ours_deformable`: the same as Co-Deformable-DETR (`model.decoder_query_pos=proposal`,
  `model.use_dn=false`, `model.encoder_proposal_classes=class_agnostic`, position temperature
  10000; not in the default `--models`);
- `peer`: HF `DeformableDetrForObjectDetection`, two-stage + box refinement, with three fixes
  (see `bench/peer_hf.py`), trained by our `SetCriterion`.

Every `--eval-every` seconds of training the model is evaluated on the val split (COCO AP/AP50 with
`codetr.tasks.coco_eval`); the evaluation time is excluded from the budget. One thread by
default: on the shared 2-core machine two threads become ~10x slower under any other load. The
budget is process CPU time by default (`--clock cpu`, fair on a shared machine) or wall-clock time
(`--clock wall`); see `bench/learning_run.py`.

Data: the synthetic shapes of `params.yaml` (default), or any real COCO set with `--data JSON
--images DIR` and a val split (`--val-data/--val-images`, or `--val-fraction`/`--split-seed` of
`--data` after an optional `--categories` selection; `bench/learning_data.py`), resized with
`--image-size` (the same keys for every model). `--diagnostics` records per-mark loss groups,
positives per image and an encoder-proposal probe (`bench/learning_diag.py`).

    .venv/bin/python bench/learning.py --budget 600 --eval-every 60
    .venv/bin/python bench/learning.py --budget 600 --eval-every 120 --parallel
    .venv/bin/python bench/learning.py --budget 20 --eval-every 10 --num-train 32 --num-val 16
    .venv/bin/python bench/learning.py --data ../shared/data/coco128/annotations/instances.json \
        --images ../shared/data/coco128/images --categories person --val-fraction 0.25 \
        --image-size 320 --budget 600 --eval-every 120 --parallel --diagnostics
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from codetr.data.subset import SubsetError  # noqa: E402
from codetr.fileio import atomic_write_text  # noqa: E402
from learning_data import (bench_spec, prepare_backbone, real_data,  # noqa: E402
                           synthetic_data)
from learning_report import equal_steps, format_tables  # noqa: E402
from learning_run import CLOCKS, run_model  # noqa: E402

MODELS = ("ours", "ours_no_co", "ours_rcnn", "peer")
EXTRA_MODELS = ("ours_deformable",)  # run only when named in --models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per model")
    parser.add_argument("--eval-every", type=float, default=60.0, help="training seconds per mark")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="budget clock: process CPU time (default) or wall-clock time")
    parser.add_argument("--num-train", type=int, default=1000, help="synthetic train images")
    parser.add_argument("--num-val", type=int, default=100, help="synthetic val images")
    parser.add_argument("--data", help="a real COCO JSON to train on (instead of the synthetic data)")
    parser.add_argument("--images", help="the image folder of --data")
    parser.add_argument("--val-data", help="a COCO JSON to validate on (else a split of --data)")
    parser.add_argument("--val-images", help="the image folder of --val-data (default --images)")
    parser.add_argument("--categories", default="",
                        help="comma list of category names of --data to keep (default all)")
    parser.add_argument("--val-fraction", type=float, default=0.25,
                        help="share of --data's images held out for val (without --val-data)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the by-image split")
    parser.add_argument("--image-size", type=int,
                        help="longer image side in px, train and eval, every model (default: "
                             "params.yaml's resize keys)")
    parser.add_argument("--seed", type=int, help="train.seed of every model (default params.yaml's)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="per-mark loss groups, positives per image, encoder-proposal probe")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma list of {MODELS + EXTRA_MODELS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--parallel", action="store_true",
                        help="train the models side by side (one process each) instead of in turn")
    parser.add_argument("--workers", type=int, default=0, help="train dataloader workers")
    parser.add_argument("--schedule", action=argparse.BooleanOptionalAction, default=None,
                        help="the trainer's per-step lr schedule (warm-up, MultiStep by epoch); "
                             "default on for the synthetic data, off with --data (see below)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra spec override for every model (repeatable)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "learning.json"))
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = set(args.models) - set(MODELS + EXTRA_MODELS)
    if unknown or not args.models:
        parser.error(f"--models must name some of {MODELS + EXTRA_MODELS}, got {sorted(unknown) or 'none'}")
    if args.budget <= 0 or args.eval_every <= 0:
        parser.error("--budget and --eval-every must be > 0")
    if (args.data is None) != (args.images is None):
        parser.error("--data and --images go together")
    if args.data is None and (args.val_data or args.categories):
        parser.error("--val-data and --categories need --data")
    if args.val_images and not args.val_data:
        parser.error("--val-images needs --val-data")
    # params.yaml drops the lr at epoch 3: step 750 of the synthetic 1000 images, never reached
    # in a bench budget; a real split of a few dozen images reaches it within a minute (46 images,
    # batch 4: step 33), so with --data the lr stays constant unless --schedule asks for it.
    if args.schedule is None:
        args.schedule = args.data is None
    if args.image_size is not None and args.image_size < 32:
        parser.error(f"--image-size must be >= 32, got {args.image_size}")
    return args


def prepare(args: argparse.Namespace, work: Path):
    """The bench's data (synthetic or real split); exits 2 on a bad category or split."""
    if args.data is None:
        return synthetic_data(Path(args.params), work, args.num_train, args.num_val)
    try:
        return real_data(Path(args.data), Path(args.images), work,
                         Path(args.val_data) if args.val_data else None,
                         Path(args.val_images) if args.val_images else None,
                         args.categories, args.val_fraction, args.split_seed)
    except (SubsetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    params = Path(args.params)
    data = prepare(args, work)
    backbone = prepare_backbone(params, work)
    report = {"config": dict(vars(args)), "data": data.summary, "backbone": backbone,
              "torch": torch.__version__, "results": {}}
    specs = {model: bench_spec(params, data, backbone, model, args.override, args.image_size,
                               args.seed)
             for model in args.models}
    # A fresh process per model: ru_maxrss is a per-process high-water mark. --parallel runs the
    # models side by side, so each gets the same share of a machine whose load drifts.
    ctx = multiprocessing.get_context("spawn")
    processes = len(args.models) if args.parallel else 1
    print(f"== {', '.join(args.models)}: {args.budget:.0f}s ({args.clock}) budget each, eval every "
          f"{args.eval_every:.0f}s, {args.threads} thread(s) each, "
          f"{'side by side' if args.parallel else 'one after the other'}; data {data.summary}",
          flush=True)
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        futures = {model: pool.submit(run_model, model, spec, args.budget, args.eval_every,
                                      args.threads, args.workers, args.schedule, args.clock,
                                      args.diagnostics,
                                      str(out.with_name(f"{out.stem}.{model}.partial.json")))
                   for model, spec in specs.items()}
        for model, future in futures.items():
            report["results"][model] = future.result()
            report["equal_steps"] = equal_steps(report["results"])
            atomic_write_text(out, json.dumps(report, indent=1))
    print()
    print(format_tables(report["results"], args.clock))
    print(f"\nsaved {out}")
    return report


if __name__ == "__main__":
    main()
