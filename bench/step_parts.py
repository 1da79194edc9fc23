"""The co-head's parts of a training step, timed one by one (`bench/step_profile.py --parts`).

Process-CPU milliseconds (forward + backward into a detached encoder memory) of the ATSS head's
convolutions (stacked; per tower), head + assigner + loss, the positives' own pass
(`forward_positive`, mmdet's layout) against their extra cost in the matching queries' call,
and the matcher per image (the loop it replaced) against the batched matcher.
"""
from __future__ import annotations

import statistics
import time

import torch


def cpu_ms(fn, repeats: int) -> float:
    """Median process-CPU milliseconds of `fn` after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def co_head_parts(variant, repeats: int) -> dict[str, float]:
    """CPU ms of the co-head's parts and of the matcher (module docstring), on one training
    batch of `variant` (a `step_profile.Variant` of a model with an ATSS co-head)."""
    from scipy.optimize import linear_sum_assignment

    from codetr.model.positive_queries import build_positive_queries

    model, b = variant.model, variant.batch()
    with torch.no_grad():
        feats = model.neck(model.backbone(b.images))
        masks = [torch.nn.functional.interpolate(b.masks[None].float(), size=f.shape[-2:]).bool()[0]
                 for f in feats]
        pos = [model.position_encoding(m) for m in masks]
        prepared = model.query_head.prepare(feats, masks, pos, b.targets)
    memory = prepared["memory"]
    memory.memory.requires_grad_(True)
    prepared = {**prepared, "content": prepared["content"].detach()}
    head, strides = model.bbox_head[0], model.level_strides + [model.level_strides[-1] * 2]
    sizes = torch.stack([t["size"] for t in b.targets])

    def convs(forward) -> None:
        out = forward(model.query_head.aux_feature_maps(memory))
        sum(x.sum() for group in out for x in group).backward()

    def head_and_loss() -> None:
        losses, _ = head.loss_and_positives(model.query_head.aux_feature_maps(memory), strides,
                                            b.targets)
        sum(losses.values()).backward()

    with torch.no_grad():
        _, positives = head.loss_and_positives(model.query_head.aux_feature_maps(memory), strides,
                                               b.targets)
    boxes, _, _ = build_positive_queries(positives, sizes, model.query_head.num_classes)

    def total(outputs) -> torch.Tensor:
        return sum(o["pred_logits"].sum() + o["pred_boxes"].sum() for o in outputs)

    def separate() -> None:
        total(model.query_head.forward_positive(memory, boxes, 0)).backward()

    def main_only() -> None:
        out, _ = model.query_head.finish(prepared)
        total([out] + out["aux_outputs"]).backward()

    def joint() -> None:
        out, layers = model.query_head.finish(prepared, [boxes])
        total([out] + out["aux_outputs"] + layers[0]).backward()

    matcher = variant.criterion.matcher
    out, _ = model.query_head.finish(prepared)
    logits, pred = out["pred_logits"].detach(), out["pred_boxes"].detach()

    def per_image() -> None:  # the matcher before: one cost matrix and host copy per image
        for i, t in enumerate(b.targets):
            cost = matcher.cost_matrix(logits[i], pred[i], t["labels"], t["boxes"])
            linear_sum_assignment(cost.cpu().numpy())

    # The class's own forward: the stacked form even where `ours_per_tower` replaced head.forward.
    parts = {"ATSS head convs": lambda: convs(lambda f: type(head).forward(head, f)),
             "ATSS head convs, per tower (before)":
             lambda: convs(head.forward_per_tower), "ATSS head + assign + loss": head_and_loss,
             "positive queries, own pass": separate, "main decoder alone": main_only,
             "main decoder + positives, one call": joint, "matcher, per image (before)": per_image}
    res = {name: cpu_ms(fn, repeats) for name, fn in parts.items()}
    res["matcher, whole batch"] = cpu_ms(lambda: matcher(logits, pred, b.targets), repeats)
    return res
