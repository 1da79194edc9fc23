"""Inference latency of backbones at 640x640, alone and inside the default Co-DETR.

For each backbone name: the trunk alone (``Backbone``, eval mode, no grad) and the whole model of
the default spec (``codetr.spec`` defaults: 900 queries, 6+6 layers, one ATSS co-head, which does
not run at inference) with that backbone and its four default levels, on one 640x640 image.
Medians after a warm-up on the process CPU clock with ``--threads`` threads (one thread: robust
to other jobs on a shared machine), or on the wall clock with CUDA when ``--device cuda``.

    .venv/bin/python bench/backbone_latency.py [--names resnet_50,efficientvit_b0] [--iters 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from codetr.model.backbone import Backbone  # noqa: E402
from codetr.model.builder import build_model  # noqa: E402
from codetr.spec import load_spec  # noqa: E402
from msda import time_ms  # noqa: E402

DEFAULT_NAMES = "resnet_50,efficientvit_b0,efficientvit_b1,efficientvit_b2,efficientvit_b3,fan_tiny"


def measure(name: str, size: int, iters: int, device: str) -> dict[str, float]:
    """Milliseconds of the trunk and of the whole default model with backbone ``name``."""
    clock = time.process_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    torch.manual_seed(0)
    images = torch.randn(1, 3, size, size, device=device)
    masks = torch.zeros(1, size, size, dtype=torch.bool, device=device)
    spec = load_spec(None, [f"model.backbone={name}"])
    trunk = Backbone(name, list(spec.model.return_interm_indices)).to(device).eval()
    model = build_model(spec, num_classes=80).to(device).eval()
    with torch.no_grad():
        trunk_ms = time_ms(lambda: trunk(images), iters, device, clock)
        model_ms = time_ms(lambda: model(images, masks), iters, device, clock)
    params = sum(p.numel() for p in trunk.parameters()) / 1e6
    return {"trunk_ms": trunk_ms, "model_ms": model_ms, "trunk_params_m": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default=DEFAULT_NAMES)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| backbone | trunk params (M) | trunk ms | whole model ms |  ({args.size}x{args.size}, "
          f"batch 1, {args.device}, {args.threads} thread(s), median of {args.iters})")
    print("| --- | --- | --- | --- |")
    for name in args.names.split(","):
        r = measure(name, args.size, args.iters, args.device)
        print(f"| {name} | {r['trunk_params_m']:.1f} | {r['trunk_ms']:.0f} | {r['model_ms']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
