"""Benchmark the multi-scale deformable attention paths at Co-DINO encoder sizes.

Encoder self-attention of a 512x512 image: 5 levels at strides 4, 8, 16, 32, 64 (Co-DINO
with a ResNet/ChannelMapper neck: 128^2 + 64^2 + 32^2 + 16^2 + 8^2 = 21,824 queries =
keys), hidden 256, 8 heads (D = 32), 4 points, batch 1. ``--quick`` uses a 256x256 image
(5,456 queries). Sampling locations are a random reference point per query plus offsets of
about 2 pixels of each level, as after the offsets' bias init; attention is softmaxed.

Prints milliseconds per iteration for forward and forward+backward of every path that runs
on the device (reference ``pytorch``, level-major ``levels``, gather ``cpu``, ``triton`` on CUDA
only), the ratio against the reference measured in the same run, and each path's max abs
difference from it. On CPU with one thread the clock is the process's CPU time (robust to other
jobs). ``--tao`` uses the TAO-sized encoder at 640x640 (strides 8..64, 8,500 queries).

``--step`` measures the paths where they run for real: full training steps of the default
``params.yaml`` model (forward with targets, every loss, backward, AdamW; random init, real
batches of ``bench/learning.py``'s synthetic data) and eval forwards of it, the backend switched
by ``CODETR_MSDA_BACKEND`` before each call and the paths taken in turn, so every path sees the
same machine load.

    python bench/msda.py [--quick | --tao | --default-model] [--threads 1] [--device cpu|cuda]
    python bench/msda.py --step [--steps 8] [--batch 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codetr.ops.msda import (  # noqa: E402
    BACKEND_ENV,
    multi_scale_deformable_attention_cpu,
    multi_scale_deformable_attention_levels,
    multi_scale_deformable_attention_pytorch,
    multi_scale_deformable_attention_triton,
    triton_available,
)

STRIDES = (4, 8, 16, 32, 64)


def make_inputs(image_size: int, num_heads: int, head_dim: int, num_points: int, device: str,
                strides: tuple[int, ...] = STRIDES, batch: int = 1) -> tuple[Tensor, ...]:
    """Encoder-like inputs: value [B, Nk, H, D], shapes [L, 2], starts [L], locations, weights."""
    shapes = torch.tensor([[image_size // s, image_size // s] for s in strides], device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_keys = int(sizes.sum())
    num_levels = len(strides)
    value = torch.randn(batch, num_keys, num_heads, head_dim, device=device)
    ref = torch.rand(batch, num_keys, 1, 1, 1, 2, device=device)
    # ~2 px offsets on every level: wh of level l as (w, h) for (x, y).
    pixel = 1.0 / shapes.flip(1).float().view(1, 1, 1, num_levels, 1, 2)
    offsets = 2.0 * torch.randn(batch, num_keys, num_heads, num_levels, num_points, 2, device=device) * pixel
    loc = ref + offsets
    attn = torch.randn(batch, num_keys, num_heads, num_levels * num_points, device=device).softmax(-1)
    return value, shapes, starts, loc, attn.view(batch, num_keys, num_heads, num_levels, num_points)


def time_ms(step: Callable[[], None], iters: int, device: str, clock: Callable[[], float]) -> float:
    """Median milliseconds of ``step`` on ``clock`` over ``iters`` runs after one warm-up."""
    step()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def bench_path(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], grad_out: Tensor, iters: int,
               device: str, clock: Callable[[], float]) -> tuple[float, float, Tensor]:
    """(forward ms, forward+backward ms, output) of one path."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]

    def forward() -> None:
        with torch.no_grad():
            fn(value, shapes, starts, loc, attn)

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(grad_out)

    out = fn(value, shapes, starts, loc, attn)
    return time_ms(forward, iters, device, clock), time_ms(forward_backward, iters, device, clock), out


def step_compare(backends: list[str], steps: int, batch: int, clock: Callable[[], float]) -> None:
    """Training-step and eval-forward seconds of the default model per MSDA backend, alternating."""
    sys.path.insert(0, str(REPO / "bench"))
    from learning_data import synthetic_data
    from step_setup import training_setup

    params = REPO / "params.yaml"
    root = synthetic_data(params, REPO / "bench" / "out", max(4 * batch, 64), 8)
    setup = training_setup(params, root, batch)
    model, criterion, optimizer, loader = setup.model, setup.criterion, setup.optimizer, setup.loader
    batches = [next(iter(loader)) for _ in range(2)]

    def train_step(i: int) -> None:
        b = batches[i % len(batches)]
        model.train()
        loss = sum(criterion(model(b.images, b.masks, b.targets), b.targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def eval_forward(i: int) -> None:
        b = batches[i % len(batches)]
        model.eval()
        with torch.no_grad():
            model(b.images, b.masks)

    print(f"default model, batch {batch}, {steps} alternating calls per path after one warm-up each, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for label, fn in (("train step", train_step), ("eval forward", eval_forward)):
        times: dict[str, list[float]] = {b: [] for b in backends}
        for i in range(steps + 1):
            for backend in backends:
                os.environ[BACKEND_ENV] = backend
                start = clock()
                fn(i)
                if i:  # the first round warms every path up
                    times[backend].append(clock() - start)
        os.environ.pop(BACKEND_ENV, None)
        ref = statistics.median(times[backends[0]])
        for backend in backends:
            med = statistics.median(times[backend])
            print(f"  {label:12s} {backend:8s} {1e3 * med:8.1f} ms  ({med / ref:.2f}x {backends[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256 image instead of 512x512")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--default-model", action="store_true",
                        help="the encoder of params.yaml's CPU model: 128x128, strides 8/16/32, "
                             "hidden 128 (D = 16), batch 8")
    parser.add_argument("--tao", action="store_true",
                        help="the TAO-sized encoder: 640x640, strides 8/16/32/64, hidden 256, batch 1")
    parser.add_argument("--step", action="store_true",
                        help="training steps and eval forwards of the default model per backend")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One CPU thread: process CPU time is the latency without the time other jobs on a
    # shared machine take the core away; otherwise wall clock.
    single_cpu = args.device == "cpu" and args.threads == 1
    clock, clock_name = (time.process_time, "process CPU time") if single_cpu else (time.perf_counter, "wall clock")
    if args.step:
        step_compare(["pytorch", "levels", "cpu"], args.steps, args.batch, clock)
        return
    image_size = 256 if args.quick else 512
    strides, head_dim, batch = STRIDES, 32, 1
    if args.default_model:
        image_size, strides, head_dim, batch = 128, (8, 16, 32), 16, 8
    if args.tao:
        image_size, strides = 640, (8, 16, 32, 64)
    inputs = make_inputs(image_size, num_heads=8, head_dim=head_dim, num_points=4, device=args.device,
                         strides=strides, batch=batch)
    num_queries = inputs[0].shape[1]
    grad_out = torch.randn(batch, num_queries, 8 * head_dim, device=args.device)
    paths: dict[str, Callable[..., Tensor]] = {
        "pytorch": multi_scale_deformable_attention_pytorch,
        "levels": multi_scale_deformable_attention_levels,
        "cpu": multi_scale_deformable_attention_cpu,
    }
    if args.device == "cuda" and triton_available():
        paths["triton"] = multi_scale_deformable_attention_triton
    print(f"msda bench: image {image_size}^2, strides {strides}, Nq = Nk = {num_queries}, H 8, D {head_dim}, "
          f"L {len(strides)}, P 4, batch {batch}, device {args.device}, threads {args.threads}, torch {torch.__version__}, "
          f"median of {args.iters} on {clock_name}")
    print(f"{'path':<8} {'fwd ms':>9} {'fwd x':>7} {'fwd+bwd ms':>11} {'fwd+bwd x':>10} {'max|diff|':>10}")
    results: dict[str, tuple[float, float, Tensor]] = {}
    for name, fn in paths.items():
        results[name] = bench_path(fn, inputs, grad_out, args.iters, args.device, clock)
        fwd, fwd_bwd, out = results[name]
        ref_fwd, ref_fwd_bwd, ref_out = results["pytorch"]
        diff = (out.float() - ref_out.float()).abs().max().item()
        print(f"{name:<8} {fwd:9.1f} {ref_fwd / fwd:7.2f} {fwd_bwd:11.1f} {ref_fwd_bwd / fwd_bwd:10.2f} {diff:10.2e}")


if __name__ == "__main__":
    main()
