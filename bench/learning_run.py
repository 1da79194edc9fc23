"""The learning bench's training loop: one detector, a training-time budget, an eval at every mark.

Runs in a fresh process per model (`bench/learning.py`). Two clocks measure the budget:

- `cpu`: this process's CPU time (`time.process_time`, all its threads). On a shared machine a
  process that waits for a core does not spend its budget, so equal budgets stay equal work
  whatever else runs; with 1 torch thread and the dataloader in the process it is the training
  work itself.
- `wall`: `time.perf_counter`, what a user waits (fair only on a quiet machine, or side by side).

The evaluation time (same clock) is excluded from the budget.
"""
from __future__ import annotations

import json
import resource
import time

import torch

from codetr.data.build import build_collator, build_dataloader, build_dataset, build_label_map
from codetr.fileio import atomic_write_text
from codetr.model.builder import build_criterion, build_model, build_postprocess
from codetr.spec.schema import ExperimentSpec
from codetr.tasks.coco_eval import evaluate_coco, load_ground_truth, to_coco_results
from codetr.tasks.ema import ModelEMA, auto_warmup_steps
from codetr.tasks.optim import build_optimizer, build_param_groups, build_scheduler
from learning_diag import LossLog, encoder_probe

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def build_detector(model: str, spec: ExperimentSpec, num_classes: int
                   ) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """`(detector, criterion, info)`: both speak our model/criterion contract (docs/DESIGN.md)."""
    if model == "peer":
        from peer_hf import build_peer, check_wiring, peer_criterion

        detector, info = build_peer(spec, num_classes)
        info["wiring"] = check_wiring(detector, spec)
        if max(info["wiring"].values()) > 1e-4:
            raise RuntimeError(f"peer wiring broken: max |diff| {info['wiring']}")
        return detector, peer_criterion(spec, num_classes), info
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
              workers: int, schedule: bool, clock: str = "cpu", diagnostics: bool = False,
              progress: str | None = None) -> dict:
    """Trains one detector for `budget` seconds of training time on `clock`, evaluating at every mark.

    Returns:
        `marks` (list of {mark_s, train_s, steps, AP, AP50, loss, wall_s} and, with `diagnostics`,
        `diag` = `LossLog.flush()` plus `encoder` = `encoder_probe`), `steps`, `train_s`,
        `s_per_step`, `eval_s`, `wall_s`, `clock`, `peak_rss_mib` (this process), `params_m`
        and `info`. With `progress` (a path) the marks so far are also written there (atomic
        JSON) after every mark, so a run cut short keeps what it measured.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(spec.train.seed)
    now = CLOCKS[clock]
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
    warmup = (spec.train.ema.warmup_steps if spec.train.ema.warmup_steps is not None
              else auto_warmup_steps(1000))
    ema = ModelEMA(detector, spec.train.ema.decay, warmup) if spec.train.enable_ema else None
    detector.train()

    marks, steps, eval_s, recent, log = [], 0, 0.0, [], LossLog()
    next_mark = eval_every
    start, wall_start = now(), time.perf_counter()

    def train_time() -> float:
        return now() - start - eval_s

    def mark(nominal: float) -> None:
        nonlocal eval_s
        t_train, t0 = train_time(), now()
        evaluated = detector if ema is None else ema.module
        metrics = evaluate(evaluated, postprocess, val_loader, gt, lut)
        entry = {"mark_s": nominal, "train_s": round(t_train, 2), "steps": steps,
                 "AP": metrics["AP"], "AP50": metrics["AP50"],
                 "loss": round(sum(recent) / max(1, len(recent)), 4),
                 "wall_s": round(time.perf_counter() - wall_start, 1)}
        if diagnostics:
            entry["diag"] = log.flush()
            entry["encoder"] = encoder_probe(evaluated, postprocess, val_loader, gt, lut)
        eval_s += now() - t0
        recent.clear()
        marks.append(entry)
        if progress is not None:
            atomic_write_text(progress, json.dumps({"model": model, "clock": clock,
                                                    "marks": marks}, indent=1))
        enc = entry.get("encoder") or {}
        print(f"  [{model}] {nominal:6.0f}s  step {steps:5d}  loss {entry['loss']:7.3f}  "
              f"AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}"
              + (f"  enc R50 {enc['recall50']:.3f}" if enc else ""), flush=True)

    while train_time() < budget:
        for b in train_loader:
            outputs = detector(b.images, b.masks, b.targets)
            terms = criterion(outputs, b.targets)
            loss = sum(terms.values())
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
            if diagnostics:
                log.add(terms)
                log.count(outputs, b.targets, labels.num_classes)
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
    return {"marks": marks, "steps": steps, "train_s": round(total, 2), "clock": clock,
            "s_per_step": round(total / max(1, steps), 4), "eval_s": round(eval_s, 2),
            "wall_s": round(time.perf_counter() - wall_start, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params_m": round(sum(p.numel() for p in detector.parameters()) / 1e6, 3),
            "info": info}
