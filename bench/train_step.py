"""Cost of one training step of the default model, and of its parts, on this machine.

Three measurements, each compared in the same run (the shared machine is noisy, ratios are not):

- backbone: forward + backward of the default trunk (`params.yaml` `model.backbone`) on a batch
  of `--batch` images of the default size, with the weights and inputs in NCHW (contiguous) and in
  channels_last memory format (what `codetr.model.backbone.Backbone` uses for CNN trunks);
- optimizer: one AdamW step over the default model's parameters (random gradients) with torch's
  multi-tensor (`foreach`) implementation and with the fused kernel `build_optimizer` picks;
- step: the full training step (model forward with targets, every loss, backward, AdamW) of the
  default `params.yaml` model for each batch size of `--batches`, in seconds per step and in
  seconds per image;
- with `--rcnn`: the full step with `model.use_rcnn_co_head=true` and the forward + backward of
  the Faster R-CNN co-head's parts on the default model's encoder memory: RPN (losses and
  proposals), RoI head (sampling, pooling, FCs, losses) and its positive-query decoder pass.

Medians after a warm-up (`bench/msda.py`'s `time_ms`); the clock is the process CPU time with one
thread (robust to other jobs), else the wall clock. Real images: `bench/learning.py`'s generated
copy of the default data set.

    .venv/bin/python bench/train_step.py [--threads 1] [--steps 8] [--batches 4,8] [--rcnn]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from codetr.model.backbone import Backbone  # noqa: E402
from codetr.model.builder import build_model  # noqa: E402
from codetr.model.faster_rcnn import pixel_targets  # noqa: E402
from codetr.model.positive_queries import build_positive_queries  # noqa: E402
from codetr.spec import load_spec  # noqa: E402
from codetr.tasks.optim import build_optimizer, build_param_groups  # noqa: E402
from learning_data import BenchData, bench_spec, synthetic_data  # noqa: E402
from msda import time_ms  # noqa: E402
from step_setup import training_setup  # noqa: E402

PARAMS = REPO / "params.yaml"


def seconds(step: Callable[[], None], repeats: int, clock: Callable[[], float]) -> float:
    """Median seconds of `step` over `repeats` runs after one warm-up (CPU)."""
    return time_ms(step, repeats, "cpu", clock) / 1e3


def backbone_formats(name: str, batch: int, size: int, repeats: int,
                     clock: Callable[[], float]) -> dict:
    """Forward+backward seconds of the trunk in NCHW and in channels_last."""
    images = torch.randn(batch, 3, size, size)
    out = {}
    for label, channels_last in (("nchw", False), ("channels_last", True)):
        backbone = Backbone(name, [1, 2, 3], channels_last=channels_last)

        def step() -> None:
            sum(f.sum() for f in backbone(images)).backward()

        out[label] = seconds(step, repeats, clock)
    out["ratio"] = out["nchw"] / out["channels_last"]
    return out


def optimizer_kinds(data: BenchData, repeats: int, clock: Callable[[], float]) -> dict:
    """Seconds of one AdamW step, foreach vs fused, over the default model's parameters."""
    spec = bench_spec(PARAMS, data, None, "ours", ["model.pretrained_backbone_path=null"])
    model = build_model(spec, spec.dataset.num_classes)
    groups = build_param_groups(model, spec.train.optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    cfg = spec.train.optim
    foreach = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    fused = build_optimizer(groups, cfg)
    out = {"foreach": seconds(foreach.step, repeats, clock),
           "fused": seconds(fused.step, repeats, clock)}
    out["ratio"] = out["foreach"] / out["fused"]
    return out


def train_steps(data: BenchData, batch: int, steps: int, clock: Callable[[], float],
                model_name: str = "ours") -> dict:
    """Seconds per training step of the default model (or a `bench/learning.py` variant) at
    `batch` images per step."""
    setup = training_setup(PARAMS, data, batch, model_name)
    model, criterion, optimizer = setup.model, setup.criterion, setup.optimizer
    batches = iter(setup.loader)

    def step() -> None:
        b = next(batches)
        loss = sum(criterion(model(b.images, b.masks, b.targets), b.targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    per_step = seconds(step, steps, clock)
    return {"batch": batch, "s_per_step": per_step, "s_per_image": per_step / batch}


def rcnn_parts(data: BenchData, batch: int, steps: int, clock: Callable[[], float]) -> dict:
    """Forward + backward seconds of the Faster R-CNN co-head's parts on one batch.

    The encoder memory is computed once and detached (a leaf), so each timing covers one part and
    its backward into the memory: the RPN (with the co-head maps' downsample and the proposals),
    the RoI head on the RPN's proposals, and the RoI positives' decoder pass (queries, decoder,
    branches; a sum of the outputs stands in for their cheap loss).
    """
    setup = training_setup(PARAMS, data, batch, "ours_rcnn")
    model = setup.model.train()
    num_classes = setup.criterion.num_classes
    b = next(iter(setup.loader))
    with torch.no_grad():
        feats = model.neck(model.backbone(b.images))
        masks = [torch.nn.functional.interpolate(b.masks[None].float(), size=f.shape[-2:])
                 .to(torch.bool)[0] for f in feats]
        pos = [model.position_encoding(m).to(f.dtype) for m, f in zip(masks, feats)]
        memory = model.query_head(feats, masks, pos, b.targets)["memory"]
    memory.memory.requires_grad_(True)
    gts, gt_labels, sizes = pixel_targets(b.targets, b.images.device)
    maps = model.query_head.aux_feature_maps(memory)
    _, proposals = model.rpn_head.loss_and_proposals(maps, gts, sizes)
    _, positives, _ = model.roi_head[0].loss_and_positives(maps[:-1], proposals, gts, gt_labels)
    image_sizes = torch.stack([t["size"] for t in b.targets])

    def rpn() -> None:
        losses, _ = model.rpn_head.loss_and_proposals(model.query_head.aux_feature_maps(memory),
                                                      gts, sizes)
        sum(v.sum() for v in losses.values()).backward()

    def roi() -> None:
        level_maps = model.query_head.aux_feature_maps(memory)[:-1]
        losses, _, _ = model.roi_head[0].loss_and_positives(level_maps, proposals, gts, gt_labels)
        sum(losses.values()).backward()

    def positive() -> None:
        boxes, _, _ = build_positive_queries(positives, image_sizes, num_classes)
        layers = model.query_head.forward_positive(memory, boxes, 0)
        sum(o["pred_logits"].sum() + o["pred_boxes"].sum() for o in layers).backward()

    return {name: seconds(fn, steps, clock) for name, fn in
            (("rpn", rpn), ("roi", roi), ("positive_queries", positive))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", default="4,8")
    parser.add_argument("--rcnn", action="store_true",
                        help="also time the step with the Faster R-CNN co-head and its parts")
    parser.add_argument("--only-rcnn", action="store_true",
                        help="only the Faster R-CNN measurements (first batch size)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock, clock_name = ((time.process_time, "process CPU time") if args.threads == 1
                         else (time.perf_counter, "wall clock"))
    data = synthetic_data(PARAMS, REPO / "bench" / "out", 1000, 100)
    if args.rcnn or args.only_rcnn:
        batch = int(args.batches.split(",")[0])
        with_rcnn = train_steps(data, batch, args.steps, clock, "ours_rcnn")["s_per_step"]
        without = train_steps(data, batch, args.steps, clock)["s_per_step"]
        parts = rcnn_parts(data, batch, args.steps, clock)
        print(f"batch {batch}, {clock_name}: step {without:.3f} s ATSS only, {with_rcnn:.3f} s with "
              f"the Faster R-CNN co-head; its parts (fwd+bwd): " +
              ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()))
        if args.only_rcnn:
            return
    spec = load_spec(PARAMS)
    size = max(spec.dataset.augmentation.scales)
    bb = backbone_formats(spec.model.backbone, spec.dataset.batch_size, size, args.steps, clock)
    print(f"backbone {spec.model.backbone} fwd+bwd, {spec.dataset.batch_size}x{size}^2, "
          f"{args.threads} thread(s), {clock_name}: NCHW {bb['nchw']:.3f} s, channels_last "
          f"{bb['channels_last']:.3f} s, ratio {bb['ratio']:.2f}x")
    opt = optimizer_kinds(data, args.steps, clock)
    print(f"AdamW step: foreach {opt['foreach'] * 1e3:.1f} ms, fused {opt['fused'] * 1e3:.1f} ms, "
          f"ratio {opt['ratio']:.2f}x")
    print(f"{'batch':>5} {'s/step':>7} {'s/image':>8}")
    for batch in (int(b) for b in args.batches.split(",")):
        res = train_steps(data, batch, args.steps, clock)
        print(f"{res['batch']:>5} {res['s_per_step']:>7.3f} {res['s_per_image']:>8.4f}")


if __name__ == "__main__":
    main()
