"""Diagnostics of the learning bench: what the collaborative heads change, in numbers.

Three records, all taken from the bench's own run (`bench/learning.py --diagnostics`):

- loss curves per group (`LossLog`): every weighted term of the training loss averaged over the
  steps between two marks, and summed into groups by the criterion's names (docs/DESIGN.md):
  `one_to_one` (the matched queries: last layer and earlier layers), `interm` (the encoder
  proposals, suffix `_interm`), `dn` (denoising, `_dn*`), `pos` (the co-heads' positive queries
  through the decoder, `_pos{h}_{l}`) and `co` (the co-heads' own dense losses, `_co{k}`);
- supervision per image (`LossLog.count`): ground-truth boxes (= the one-to-one Hungarian
  matches per decoder layer) against each co-head's one-to-many positives, counted from the
  positive queries' targets (labels below `num_classes`; capped at the positive-query limit, 300);
- encoder feature quality (`encoder_probe`): the two-stage top-k encoder proposals of the
  evaluated weights on the val split, as class-agnostic recall of the ground truth at IoU 0.5,
  and as detections (their own class scores) through the COCO evaluation (AP/AP50).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from codetr.boxes import box_cxcywh_to_xyxy
from codetr.tasks.coco_eval import evaluate_coco, to_coco_results

GROUPS = ("one_to_one", "interm", "dn", "pos", "co")


def loss_group(name: str) -> str:
    """The group of one criterion term name (see the module docstring)."""
    if "_co" in name and re.search(r"_co\d+$", name):
        return "co"
    if re.search(r"_pos\d+_\d+$", name):
        return "pos"
    if "_dn" in name:
        return "dn"
    if name.endswith("_interm"):
        return "interm"
    return "one_to_one"


class LossLog:
    """Per-step loss terms and supervision counts, averaged and reset at every mark."""

    def __init__(self) -> None:
        self.terms: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, list[float]] = defaultdict(list)

    def add(self, losses: dict[str, Tensor]) -> None:
        """Records one step's weighted terms (scalars)."""
        for name, value in losses.items():
            self.terms[name].append(float(value.detach()))

    def count(self, outputs: dict, targets: list[dict], num_classes: int) -> None:
        """Records one step's boxes per image and each co-head's positives per image."""
        self.counts["gt_per_image"].append(
            sum(int(t["labels"].numel()) for t in targets) / max(1, len(targets)))
        for head, pos in enumerate(outputs.get("pos_outputs", [])):
            labels = pos["targets"]["labels"]  # [B, N], num_classes on the pads
            self.counts[f"positives_per_image_co{head}"].append(
                float((labels < num_classes).sum()) / max(1, labels.shape[0]))

    def flush(self) -> dict:
        """`{"terms": {name: mean}, "groups": {group: mean sum}, "counts": {name: mean}}`."""
        terms = {k: round(sum(v) / len(v), 5) for k, v in sorted(self.terms.items()) if v}
        groups: dict[str, float] = defaultdict(float)
        for name, value in terms.items():
            groups[loss_group(name)] += value
        counts = {k: round(sum(v) / len(v), 2) for k, v in sorted(self.counts.items()) if v}
        self.terms.clear()
        self.counts.clear()
        return {"terms": terms, "groups": {g: round(groups[g], 5) for g in GROUPS if g in groups},
                "counts": counts}


def encoder_proposals(detector: torch.nn.Module, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """The top-k two-stage encoder proposals of our detector (eval mode, no decoder).

    Args:
        detector: a `CoDETR` with `two_stage_type: standard`.
        images: `[B, 3, H, W]` normalised, padded; masks: `[B, H, W]` bool, True on padding.

    Returns:
        `pred_logits` `[B, K, C]` (the encoder class branch), `pred_boxes` `[B, K, 4]` cxcywh
        normalised by the unpadded image size, as the decoder outputs (so `PostProcess` applies).
    """
    feats = detector.neck(detector.backbone(images))
    level_masks = [F.interpolate(masks[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
                   for f in feats]
    level_pos = [detector.position_encoding(m).to(f.dtype) for m, f in zip(level_masks, feats)]
    head = detector.query_head
    memory = head.transformer.encode(feats, level_masks, level_pos)
    _, _, topk = head.transformer.select_queries(memory, head.cls_branches[-1],
                                                 head.reg_branches[-1])
    return {"pred_logits": topk.logits, "pred_boxes": topk.boxes_unsig.sigmoid()}


@torch.no_grad()
def encoder_probe(detector: torch.nn.Module, postprocess: torch.nn.Module, loader, gt: dict,
                  lut, iou: float = 0.5) -> dict[str, float] | None:
    """Recall at `iou` and COCO AP/AP50 of the encoder proposals on `loader`; None for the peer
    or a detector without two-stage proposals."""
    head = getattr(detector, "query_head", None)
    if head is None or getattr(head, "two_stage_type", "standard") != "standard":
        return None
    was_training = detector.training
    detector.eval()
    found = total = 0
    results = []
    for batch in loader:
        props = encoder_proposals(detector, batch.images, batch.masks)
        orig = torch.stack([t["orig_size"] for t in batch.targets])
        dets = postprocess(props, orig)
        for target, det, boxes in zip(batch.targets, dets, props["pred_boxes"]):
            results += to_coco_results(int(target["image_id"]), det["scores"], det["labels"],
                                       det["boxes"], lut)
            if target["boxes"].numel() == 0:
                continue
            # Proposals and targets are both cxcywh normalised by the unpadded image size.
            h, w = (int(s) for s in target["size"])
            scale = target["boxes"].new_tensor([w, h, w, h])
            gt_px = box_cxcywh_to_xyxy(target["boxes"]) * scale
            pr_px = box_cxcywh_to_xyxy(boxes) * scale
            found += int((box_iou(gt_px, pr_px).max(dim=1).values >= iou).sum())
            total += int(target["boxes"].shape[0])
    detector.train(was_training)
    stats = evaluate_coco(gt, results).stats
    return {"recall50": round(found / max(1, total), 4), "AP": stats["AP"], "AP50": stats["AP50"]}
