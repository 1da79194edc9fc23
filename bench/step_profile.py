"""Training-step cost of the default model with / without its ATSS co-head and of the HF peer,
measured alternately in one process, plus where the time goes.

Each variant (`ours` = `params.yaml`, `ours_no_co` = `model.num_co_heads=0`, `peer` = the HF
`DeformableDetrForObjectDetection` of `bench/peer_hf.py` trained by our criterion) gets its own
model, optimizer and data loader over `bench/learning.py`'s generated copy of the default data
set. Rounds alternate the variants step by step (ours, ours_no_co, peer, ours, ...) so a change
of the machine's load hits all of them alike; the clock is the process CPU time of one thread.
The step is the trainer's: forward with targets, every loss, backward, gradient clipping, AdamW.

`--profile` adds a `torch.profiler` table per variant (self CPU time by op) and the forward
time of the named parts (`record_function` wrappers put around the part's entry point by this
script only: ATSS head + assigner + loss, positive-query decoder pass, matcher, denoising
queries, criterion).

    .venv/bin/python bench/step_profile.py [--rounds 12] [--variants ours,ours_no_co,peer]
        [--profile] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from codetr.data.build import (build_collator, build_dataloader, build_dataset,  # noqa: E402
                               build_label_map)
from codetr.tasks.optim import build_optimizer, build_param_groups  # noqa: E402
from learning import bench_spec, build_detector, prepare_data  # noqa: E402

PARAMS = REPO / "params.yaml"


class Variant:
    """One detector with its criterion, optimizer and an endless stream of training batches."""

    def __init__(self, name: str, data_root: Path, batch: int) -> None:
        self.name = name
        spec = bench_spec(PARAMS, data_root, None, name,
                          [f"dataset.batch_size={batch}", "model.pretrained_backbone_path=null"])
        torch.manual_seed(0)
        labels = build_label_map(spec)
        self.loader = build_dataloader(build_dataset(spec, "train", labels), batch, 0, True,
                                       build_collator(spec, "train"), drop_last=True, seed=0)
        self.model, self.criterion, _ = build_detector(name, spec, labels.num_classes)
        self.model.train()
        optim = spec.train.optim
        self.optimizer = build_optimizer(build_param_groups(self.model, optim), optim)
        self.clip = spec.train.clip_grad_norm
        self._batches = iter(self.loader)
        self.times: list[float] = []

    def batch(self):
        """The next training batch (the loader restarts when it runs out)."""
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches)

    def step(self, b) -> float:
        """One training step on batch `b`; returns the loss."""
        loss = sum(self.criterion(self.model(b.images, b.masks, b.targets), b.targets).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(loss.detach())

    def timed_step(self) -> None:
        """One step, its process CPU time appended to `times` (data loading not counted)."""
        b = self.batch()
        t0 = time.process_time()
        self.step(b)
        self.times.append(time.process_time() - t0)


def _wrap(owner, attr: str, label: str) -> None:
    """Puts `record_function(label)` around `owner.attr` (a function or bound method)."""
    fn = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    setattr(owner, attr, wrapped)


def label_parts(variant: Variant) -> None:
    """Named profiler ranges around the parts the issue asks about (forward side only)."""
    import codetr.losses.atss_loss as atss_loss
    import codetr.model.query_head as query_head
    from codetr.losses import criterion as criterion_mod

    model, crit = variant.model, variant.criterion
    if hasattr(model, "bbox_head"):
        for head in model.bbox_head:
            _wrap(head, "loss_and_positives", "part: ATSS head+assign+loss")
        _wrap(model.query_head, "forward_positive", "part: positive-query decoder pass")
    inner = getattr(crit, "criterion", crit)
    _wrap(inner.matcher, "forward", "part: Hungarian matcher")
    _wrap(inner, "forward", "part: criterion (incl. matcher)")
    if not getattr(atss_loss.atss_assign, "_wrapped", False):
        _wrap(atss_loss, "atss_assign", "part: ATSS assigner")
        atss_loss.atss_assign._wrapped = True
        _wrap(query_head, "build_denoising_queries", "part: denoising queries")
    del criterion_mod


def profile_table(variant: Variant, steps: int, rows: int) -> str:
    """Self-CPU-time op table and named parts of `steps` profiled steps."""
    label_parts(variant)
    batches = [variant.batch() for _ in range(steps)]
    variant.step(variant.batch())  # warm-up with the wrappers in place
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for b in batches:
            variant.step(b)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    parts = sorted((e for e in averages if e.key.startswith("part: ")),
                   key=lambda e: -e.cpu_time_total)
    lines = [f"--- {variant.name}: {steps} profiled steps, {total / 1e3 / steps:.1f} ms self CPU "
             f"per step ---", f"{'op':<44} {'self ms/step':>12} {'share':>6}"]
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:rows]:
        if e.key.startswith("part: "):
            continue
        lines.append(f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e3 / steps:>12.1f} "
                     f"{e.self_cpu_time_total / total:>6.1%}")
    lines.append(f"{'part (forward, incl. children)':<44} {'ms/step':>12} {'share':>6}")
    for e in parts:
        lines.append(f"{e.key[6:50]:<44} {e.cpu_time_total / 1e3 / steps:>12.1f} "
                     f"{e.cpu_time_total / total:>6.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", default="ours,ours_no_co,peer")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=22)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_root = prepare_data(PARAMS, REPO / "bench" / "out", 1000, 100)
    variants = [Variant(name, data_root, args.batch) for name in args.variants.split(",")]
    for _ in range(args.warmup):
        for v in variants:
            v.step(v.batch())
    for _ in range(args.rounds):
        for v in variants:
            v.timed_step()
    base = statistics.median(variants[0].times)
    print(f"batch {args.batch}, 1 thread, process CPU time, {args.rounds} alternating rounds "
          f"(median s/step; ratio to {variants[0].name} and to each other)")
    med = {v.name: statistics.median(v.times) for v in variants}
    for v in variants:
        print(f"  {v.name:<12} {med[v.name]:.3f} s/step  x{med[v.name] / base:.3f}")
    if "ours" in med and "ours_no_co" in med:
        print(f"  ours / ours_no_co = {med['ours'] / med['ours_no_co']:.3f}")
    if "ours_no_co" in med and "peer" in med:
        print(f"  ours_no_co / peer = {med['ours_no_co'] / med['peer']:.3f}")
    if args.profile:
        for v in variants:
            print(profile_table(v, args.profile_steps, args.rows))


if __name__ == "__main__":
    main()
