"""Eval forward per image: our Co-DETR against HF transformers' Deformable DETR, same sizes.

Two sizes, random weights (latency does not depend on them), batch 1, eval mode, no grad:

- `tao`: TAO's default Co-DINO head on a ResNet-50 (random init, 4 levels, hidden 256, 8 heads,
  6 + 6 layers, FFN 2048, 900 queries, 4 points) at 640x640;
- `default`: the model of params.yaml at its input size (`export.input_height/width`).

The peer is `DeformableDetrForObjectDetection(two_stage=True, with_box_refine=True)` with the
same sizes and trunk (`bench/peer_hf.py`'s config; its trunk gets timm's own BatchNorm modules
back, as in the learning bench). Ours runs as `codetr evaluate/inference` run it: folded for eval
(`codetr.model.eval_fold`) unless `--no-fold`. Both models' outputs before post-processing.

The two models run the same image alternately, `--runs` times each after a warm-up; with one
thread the clock is the process CPU time (robust to other jobs), else the wall clock. Also
printed: the FLOPs of one forward of each (torch.profiler's `with_flops` estimates: matmuls and
convolutions; grid_sample, softmax and element-wise ops count 0), the rate they reach against a big
fp32 matmul measured in the same run, and our forward's top ops (`torch.profiler`, self CPU time).
The row `ours, no memo` times our same forward with the geometry memo off
(`codetr.model.geometry_memo.memo_disabled`), in the same alternation: what the memo saves.

    python bench/infer_speed.py [--runs 5] [--threads 1] [--models tao,default] [--no-fold]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from export import alternate  # noqa: E402
from export import models as specs  # noqa: E402  (tao / default: the same specs as bench/export.py)
from peer_hf import hf_config, prior_init, unfreeze_batch_norm  # noqa: E402

from codetr.model.builder import build_model  # noqa: E402
from codetr.model.eval_fold import fold_for_eval  # noqa: E402
from codetr.model.geometry_memo import memo_disabled  # noqa: E402


def build_peer_eval(spec, num_classes: int) -> nn.Module:
    """HF's two-stage, box-refine Deformable DETR with our sizes, trunk modules restored, eval mode."""
    from transformers import DeformableDetrForObjectDetection

    config = hf_config(spec, num_classes)
    detr = DeformableDetrForObjectDetection(config)
    unfreeze_batch_norm(detr.model.backbone.model, config.backbone_config.backbone,
                        list(config.backbone_config.out_indices))
    prior_init(detr)
    return detr.eval()


def matmul_rate(clock: Callable[[], float], size: int = 2048, runs: int = 3) -> float:
    """FLOP/s of a square fp32 matmul (the CPU's practical GEMM peak on these threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(runs):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * size ** 3 / best


def profile(fn: Callable[[], object], rows: int, calls: int) -> tuple[int, str]:
    """FLOPs of one call and its top ops by self CPU time per call (name, ms, share, calls),
    over ``calls`` calls.

    FLOPs are torch.profiler's estimates (``with_flops``: matmul, addmm, bmm, convolution);
    grid_sample, softmax and element-wise ops count 0.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(calls):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    flops = sum(e.flops for e in events) // calls
    lines = [f"    {'op':34s} {'self ms':>9s} {'share':>6s} {'calls':>6s}"]
    for e in events[:rows]:
        lines.append(f"    {e.key[:34]:34s} {e.self_cpu_time_total / 1e3 / calls:9.1f} "
                     f"{100 * e.self_cpu_time_total / total:5.1f}% {e.count // calls:6d}")
    return flops, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="tao,default")
    parser.add_argument("--no-fold", action="store_true", help="ours without eval folding")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--profile-calls", type=int, default=0,
                        help="forwards per profile (default: 1 at 640x640, 10 at smaller sizes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    rate = matmul_rate(clock)
    print(f"threads {args.threads}, runs {args.runs}, torch {torch.__version__}, clock "
          f"{'process CPU time' if args.threads == 1 else 'wall'}; fp32 2048^3 matmul: {rate / 1e9:.1f} GFLOP/s")
    for name, spec, num_classes, (h, w) in specs(args.models.split(",")):
        torch.manual_seed(0)
        ours = build_model(spec, num_classes, load_pretrained_backbone=False).eval()
        if not args.no_fold:
            fold_for_eval(ours)
        peer = build_peer_eval(spec, num_classes)
        image = torch.randn(1, 3, h, w)
        mask = torch.zeros(1, h, w, dtype=torch.bool)
        pixel_mask = torch.ones(1, h, w, dtype=torch.long)

        @torch.no_grad()
        def run_ours():
            return ours(image, mask)

        @torch.no_grad()
        def run_peer():
            return peer(pixel_values=image, pixel_mask=pixel_mask)

        @torch.no_grad()
        def run_ours_no_memo():
            with memo_disabled():
                return ours(image, mask)

        fns = {"ours": run_ours, "ours, no memo": run_ours_no_memo, "hf peer": run_peer}
        result = alternate(fns, args.runs, clock)
        calls = args.profile_calls or (1 if h * w >= 640 * 640 else 10)
        profiles = {k: profile(fns[k], args.profile_rows, calls) for k in ("ours", "hf peer")}
        flops = {k: v[0] for k, v in profiles.items()}
        params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in (("ours", ours), ("hf peer", peer))}
        print(f"\n{name}: {spec.model.backbone}, {spec.model.num_queries} queries, {h}x{w}, "
              f"{spec.model.enc_layers}+{spec.model.dec_layers} layers, hidden {spec.model.hidden_dim}"
              f"{'' if args.no_fold else ', ours folded for eval'}")
        print(f"    {'model':13s} {'params M':>8s} {'ms/image':>9s} {'ratio':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'of matmul':>9s}")
        for k, sec in result.items():
            model_of = "hf peer" if k == "hf peer" else "ours"  # the memo changes no FLOP count
            gf = flops[model_of] / 1e9
            print(f"    {k:13s} {params[model_of]:8.1f} {1e3 * sec:9.1f} {sec / result['hf peer']:5.2f}x "
                  f"{gf:7.1f} {gf / sec:8.1f} {flops[model_of] / sec / rate:8.0%}")
        for k, (_, table) in profiles.items():
            print(f"  {k}, top ops per forward (torch.profiler, self CPU time, {calls} forwards):\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
