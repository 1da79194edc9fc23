"""Training-step cost of the default model with / without its ATSS co-head and of the HF peer,
measured alternately in one process, plus where the time goes.

Each variant (`ours` = `params.yaml`, `ours_no_co` = `model.num_co_heads=0`, `peer` = the HF
`DeformableDetrForObjectDetection` of `bench/peer_hf.py` trained by our criterion) gets its own
model, optimizer and data loader over `bench/learning.py`'s generated copy of the default data
set. Rounds alternate the variants step by step (ours, ours_no_co, peer, ours, ...) so a change
of the machine's load hits all of them alike; the clock is the process CPU time of one thread
(`--threads N` > 1: wall-clock time of N intra-op threads, the setting `codetr train` runs in on
this 2-core machine; noisier, since the other core's load enters it).
The step is the trainer's: forward with targets, every loss, backward, gradient clipping, AdamW.

`--profile` adds a `torch.profiler` table per variant (self CPU time by op) and the forward
time of the named parts (`record_function` wrappers put around the part's entry point by this
script only: ATSS head + assigner + loss, positive-query decoder pass, matcher, denoising
queries, criterion).

    .venv/bin/python bench/step_profile.py [--rounds 12] [--variants ours,ours_no_co,peer]
        [--profile] [--parts] [--batch 4] [--threads 1]
        (variant + a `BEFORE` suffix: the variant before one change)

`--parts`: the co-head's parts timed one by one (`bench/step_parts.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from learning_data import BenchData, synthetic_data  # noqa: E402
from step_parts import co_head_parts  # noqa: E402
from step_setup import training_setup  # noqa: E402

PARAMS = REPO / "params.yaml"
# `<variant><suffix>`: the variant as it was before one speed change, timed in the same run:
#   `_onednn_dw`: oneDNN's depthwise weight gradient (before codetr/ops/depthwise_conv.py);
#   `_per_tower`: the ATSS co-head layer by layer (before its towers were stacked);
#   `_nd_rows`: the transformer's Linears on N-D inputs (before `codetr.model.mlp.flat_rows`).
# e.g. `--variants ours,ours_per_tower,ours_no_co`.
BEFORE = ("_onednn_dw", "_per_tower", "_nd_rows")


def split_variant(name: str) -> tuple[str, str]:
    """`ours_no_co_onednn_dw` -> `("ours_no_co", "_onednn_dw")`; no suffix -> `(name, "")`."""
    suffix = next((s for s in BEFORE if name.endswith(s)), "")
    return name.removesuffix(suffix), suffix


class Variant:
    """One detector with its criterion, optimizer and an endless stream of training batches."""

    def __init__(self, name: str, data: BenchData, batch: int, clock=time.process_time) -> None:
        from codetr.ops.depthwise_conv import onednn_weight_grad

        self.name = name
        base, suffix = split_variant(name)
        self.context = onednn_weight_grad if suffix == "_onednn_dw" else contextlib.nullcontext
        setup = training_setup(PARAMS, data, batch, base)
        spec, self.loader = setup.spec, setup.loader
        self.model, self.criterion, self.optimizer = setup.model, setup.criterion, setup.optimizer
        if suffix == "_per_tower":
            for head in getattr(self.model, "bbox_head", []):
                head.forward = head.forward_per_tower  # what nn.Module.__call__ runs
        if suffix == "_nd_rows":
            nd_rows(self.model)
        self.model.train()
        self.clip = spec.train.clip_grad_norm
        self._batches = iter(self.loader)
        self.clock = clock  # seconds: process CPU time (one thread) or wall clock
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
        with self.context():
            loss = sum(self.criterion(self.model(b.images, b.masks, b.targets), b.targets).values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(loss.detach())

    def timed_step(self) -> None:
        """One step, its `clock` time appended to `times` (data loading not counted)."""
        b = self.batch()
        t0 = self.clock()
        self.step(b)
        self.times.append(self.clock() - t0)


def nd_rows(model: torch.nn.Module) -> None:
    """`model`'s MLP / FFN / deformable-attention value projections as they were before
    `flat_rows`: their Linears return views of the 2-D result, so the in-place ReLUs and padding
    fill make autograd rebase those views (the same values)."""
    from torch import nn

    from codetr.model.deformable_attention import MultiScaleDeformableAttention
    from codetr.model.mlp import FFN, MLP

    def as_view(linear: nn.Linear):
        return lambda rows: nn.functional.linear(rows[None], linear.weight, linear.bias)[0]

    for module in model.modules():
        if isinstance(module, MLP):
            module.forward = nn.Sequential.forward.__get__(module)
        elif isinstance(module, FFN):
            module.forward = (lambda m: lambda x: x + m.layers(x))(module)
        elif isinstance(module, MultiScaleDeformableAttention):
            module.value_proj.forward = as_view(module.value_proj)


def round_ratios(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``a[i] / b[i]``.

    The two steps of a round ran back to back, so a change of the machine's load between rounds
    cancels in their ratio; the quartiles say how far one round's ratio can be trusted.
    """
    ratios = [x / y for x, y in zip(a, b)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, mid, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return mid, low, high


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
    parser.add_argument("--parts", action="store_true",
                        help="CPU ms of the co-head's parts and of the matcher (first variant)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; > 1 times the steps by the wall clock")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock, clock_name = ((time.process_time, "1 thread, process CPU time") if args.threads == 1
                         else (time.perf_counter, f"{args.threads} threads, wall clock"))
    data = synthetic_data(PARAMS, REPO / "bench" / "out", 1000, 100)
    variants = [Variant(name, data, args.batch, clock) for name in args.variants.split(",")]
    for _ in range(args.warmup):
        for v in variants:
            v.step(v.batch())
    for _ in range(args.rounds):
        for v in variants:
            v.timed_step()
    base = statistics.median(variants[0].times)
    print(f"batch {args.batch}, {clock_name}, {args.rounds} alternating rounds "
          f"(median s/step; ratio to {variants[0].name} and to each other)")
    med = {v.name: statistics.median(v.times) for v in variants}
    for v in variants:
        print(f"  {v.name:<22} {med[v.name]:.3f} s/step  x{med[v.name] / base:.3f}")
    by_name = {v.name: v for v in variants}
    pairs = [("ours", "ours_no_co"), ("ours_no_co", "peer")]
    pairs += [(b, v.name) for v in variants for b, s in [split_variant(v.name)] if s]
    for suffix in BEFORE:
        pairs += [("ours" + suffix, "ours_no_co" + suffix), ("ours_no_co" + suffix, "peer")]
    for a, b in pairs:
        if a in by_name and b in by_name:
            mid, low, high = round_ratios(by_name[a].times, by_name[b].times)
            print(f"  {a} / {b} = {med[a] / med[b]:.3f} (ratio of medians); per round: median "
                  f"{mid:.3f}, quartiles {low:.3f}-{high:.3f}")
    if args.parts:
        for name, ms in co_head_parts(variants[0], max(args.rounds, 5)).items():
            print(f"  part {name:<36} {ms:8.2f} ms (process CPU, median; fwd+bwd but the matcher)")
    if args.profile:
        for v in variants:
            print(profile_table(v, args.profile_steps, args.rows))


if __name__ == "__main__":
    main()
