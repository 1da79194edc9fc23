"""Does `torch.compile` (inductor, C++ on the CPU) make the training step of the default model
faster? One part of `ours_no_co` compiled, timed against the same model in eager mode.

Two `bench/step_profile.py` variants with identical seeds (same weights, same batches), one with
`--part` wrapped in `torch.compile(backend=...)`, stepped alternately: the ratio compiled/eager
per round cancels the machine's load. The first two compiled steps (tracing and code
generation, plus loading one batch) are timed on their own. Parts:

- `trunk`: `model.backbone.body` (the timm CNN: BatchNorm + ReLU6 + padding are what inductor
  could fuse; the depthwise convolutions fall back to `F.conv2d` under compile,
  `codetr/ops/depthwise_conv.py`).
- `encoder`: `model.query_head.transformer.encoder` (deformable attention on the `levels`
  path, whose sampling grid is permuted as complex64 numbers in eager mode).
- `encoder_real_grid`: the encoder with the grid permuted as real pairs (the ONNX-export form of
  `codetr/ops/msda_levels.py`; inductor generates no code for complex operators).

    .venv/bin/python bench/compile_probe.py --part trunk [--rounds 15] [--threads 2] [--backend inductor]

Prints one line: compile seconds, eager and compiled medians (s/step), the per-round ratio
(median, quartiles) and the losses of the first step of both (equal up to float reordering).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import PARAMS, REPO, Variant, round_ratios, synthetic_data  # noqa: E402

PARTS = {"trunk": ("backbone", "body"), "encoder": ("query_head", "transformer", "encoder"),
         "encoder_real_grid": ("query_head", "transformer", "encoder")}


class _RealGridForward(torch.nn.Module):
    """Runs `module` with `torch.onnx.is_in_onnx_export` reporting True: `msda_levels` then
    permutes the sampling grid as real (x, y) pairs (its export form). Only this forward sees
    the patch; the backward needs none (autograd recorded the permute)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        with mock.patch.object(torch.onnx, "is_in_onnx_export", lambda: True):
            return self.module(*args, **kwargs)


def compile_part(variant: Variant, part: str, backend: str) -> None:
    """Replace `part` of `variant.model` by `torch.compile(part, backend=backend)`."""
    *path, leaf = PARTS[part]
    owner = variant.model
    for name in path:
        owner = getattr(owner, name)
    compiled = torch.compile(getattr(owner, leaf), backend=backend)
    setattr(owner, leaf, _RealGridForward(compiled) if part == "encoder_real_grid" else compiled)


def probe(part: str, rounds: int, backend: str, out_dir: Path, num_train: int = 1000,
          num_val: int = 100, batch: int = 4) -> dict:
    """Compile seconds, eager / compiled step times and the first step's two losses.

    Both variants step through the same batches in the same order (same loader seed).
    """
    data = synthetic_data(PARAMS, out_dir, num_train, num_val)
    eager = Variant("ours_no_co", data, batch, clock=time.perf_counter)
    compiled = Variant("ours_no_co", data, batch, clock=time.perf_counter)
    compile_part(compiled, part, backend)
    first = eager.batch()
    compiled.batch()  # the same batch as `first`: both loaders stay in step
    torch.manual_seed(1)  # the same denoising noise and dropout in both first steps
    loss_eager = eager.step(first)
    start = time.perf_counter()
    torch.manual_seed(1)
    loss_compiled = compiled.step(first)
    compiled.step(compiled.batch())
    compile_s = time.perf_counter() - start
    eager.step(eager.batch())
    for _ in range(rounds):
        eager.timed_step()
        compiled.timed_step()
    mid, low, high = round_ratios(compiled.times, eager.times)
    return {"part": part, "backend": backend, "compile_s": compile_s,
            "eager_s": statistics.median(eager.times),
            "compiled_s": statistics.median(compiled.times),
            "ratio": mid, "ratio_low": low, "ratio_high": high,
            "loss_eager": loss_eager, "loss_compiled": loss_compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = probe(args.part, args.rounds, args.backend, REPO / "bench" / "out")
    print(f"{r['part']} ({r['backend']}, {args.threads} threads): compile + 2 steps "
          f"{r['compile_s']:.1f} s; eager {r['eager_s']:.3f} s/step, compiled "
          f"{r['compiled_s']:.3f} s/step; compiled / eager per round {r['ratio']:.3f} "
          f"(quartiles {r['ratio_low']:.3f}-{r['ratio_high']:.3f}); first-step loss "
          f"{r['loss_eager']:.6f} eager, {r['loss_compiled']:.6f} compiled")


if __name__ == "__main__":
    main()
