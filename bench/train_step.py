"""Cost of one training step of the default model, and of its backbone, on this machine.

Two measurements, each compared in the same run (the shared machine is noisy, ratios are not):

- backbone: forward + backward of the default trunk (`params.yaml` `model.backbone`) on a batch
  of `--batch` images of the default size, with the weights and inputs in NCHW (contiguous) and in
  channels_last memory format (what `codetr.model.backbone.Backbone` uses for CNN trunks);
- step: the full training step (model forward with targets, every loss, backward, AdamW) of the
  default `params.yaml` model for each batch size of `--batches`, in seconds per step and in
  seconds per image.

The clock is the process CPU time divided by the thread count (robust to other jobs when one
thread is used); real data from `bench/learning.py`'s generated copy of the default data set.

    .venv/bin/python bench/train_step.py [--threads 1] [--steps 8] [--batches 4,8]
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
from codetr.model.backbone import Backbone  # noqa: E402
from codetr.model.builder import build_criterion, build_model  # noqa: E402
from learning import bench_spec, prepare_data  # noqa: E402


def cpu_seconds(fn, repeats: int, threads: int) -> float:
    """Median process CPU seconds / threads of `fn()` over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) / threads)
    return statistics.median(times)


def backbone_formats(name: str, batch: int, size: int, repeats: int, threads: int) -> dict:
    """Forward+backward seconds of the trunk in NCHW and in channels_last."""
    images = torch.randn(batch, 3, size, size)
    out = {}
    for label, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        backbone = Backbone(name, [1, 2, 3])
        backbone.body.to(memory_format=fmt)
        backbone.memory_format = fmt

        def step() -> None:
            sum(f.sum() for f in backbone(images)).backward()

        out[label] = cpu_seconds(step, repeats, threads)
    out["ratio"] = out["nchw"] / out["channels_last"]
    return out


def train_steps(batch: int, steps: int, threads: int) -> dict:
    """Seconds per training step of the default model at `batch` images per step."""
    root = prepare_data(REPO / "params.yaml", REPO / "bench" / "out", 1000, 100)
    spec = bench_spec(REPO / "params.yaml", root, None, "ours",
                      [f"dataset.batch_size={batch}", "model.pretrained_backbone_path=null"])
    torch.manual_seed(0)
    labels = build_label_map(spec)
    loader = build_dataloader(build_dataset(spec, "train", labels), batch, 0, True,
                              build_collator(spec, "train"), drop_last=True, seed=0)
    model = build_model(spec, labels.num_classes)
    criterion = build_criterion(spec, labels.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = iter(loader)

    def step() -> None:
        b = next(batches)
        loss = sum(criterion(model(b.images, b.masks, b.targets), b.targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds = cpu_seconds(step, steps, threads)
    return {"batch": batch, "s_per_step": seconds, "s_per_image": seconds / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", default="4,8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = bench_spec(REPO / "params.yaml", Path("."), None, "ours", [])
    size = max(spec.dataset.augmentation.scales)
    bb = backbone_formats(spec.model.backbone, spec.dataset.batch_size, size, args.steps,
                          args.threads)
    print(f"backbone {spec.model.backbone} fwd+bwd, {spec.dataset.batch_size}x{size}^2, "
          f"{args.threads} thread(s): NCHW {bb['nchw']:.3f} s, channels_last "
          f"{bb['channels_last']:.3f} s, ratio {bb['ratio']:.2f}x")
    print(f"{'batch':>5} {'s/step':>7} {'s/image':>8}")
    for batch in (int(b) for b in args.batches.split(",")):
        res = train_steps(batch, args.steps, args.threads)
        print(f"{res['batch']:>5} {res['s_per_step']:>7.3f} {res['s_per_image']:>8.4f}")


if __name__ == "__main__":
    main()
