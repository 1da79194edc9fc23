"""Loss of the query head: DINO's SetCriterion extended with Co-DETR's customized positive queries.

Every group of predictions is reduced to one *assignment* (which query is supervised by which gt
box); the loss terms then follow from the assignment the same way for all groups:

- matching queries (final layer, `aux_outputs`, `interm_outputs`): Hungarian matching;
- denoising queries (`dn_outputs`): fixed by the `dn_meta` layout, no matching;
- customized positive queries (`pos_outputs`): the co-head's assigned gt, no matching.

Queries without an assignment are background: their one-hot class target is all zeros.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.boxes import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from codetr.losses.assignment import (Assignment, denoising_assignment,  # noqa: F401
                                      hungarian_assignment, positive_assignment)
from codetr.losses.focal import quality_focal_loss, sigmoid_focal_loss
from codetr.losses.matcher import HungarianMatcher

LOSS_TYPES = ("labels", "boxes")
# focal: DINO / TAO (one-hot targets, alpha); quality_focal: Co-DINO (IoU targets, beta 2).
CLS_LOSS_TYPES = ("focal", "quality_focal")



def _global_count(count: Tensor) -> Tensor:
    """Mean over ranks of a per-rank count (as DETR), clamped >= 1; no host sync.

    Dividing by the mean instead of the local count keeps every rank's loss on the same scale
    while DDP averages the gradients.
    """
    count = count.detach().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


class SetCriterion(nn.Module):
    """Weighted losses of the query head for every output group of `CoDETR.forward`.

    Output names (docs/DESIGN.md): `loss_ce`, `loss_bbox`, `loss_giou` for the last decoder layer,
    with suffix `_{l}` for the earlier decoder layers l (`aux_outputs`), `_interm` for the encoder
    proposals, `_dn` / `_dn_{l}` for the denoising queries and `_pos{h}_{l}` for co-head h's
    positive queries at decoder layer l. `co_losses` (already weighted) are copied unchanged.
    The training loss is the sum of the returned values.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, cls_loss_coef: float,
                 bbox_loss_coef: float, giou_loss_coef: float, focal_alpha: float,
                 loss_types: list[str], aux_loss: bool, interm_loss_coef: float,
                 no_interm_box_loss: bool, cls_loss_type: str = "focal",
                 interm_class_agnostic: bool = False) -> None:
        """Builds the criterion.

        Args:
            num_classes: number of class logits C.
            matcher: assigns matching queries to gt boxes.
            cls_loss_coef: weight of the class loss.
            bbox_loss_coef: weight of the L1 loss on cxcywh boxes.
            giou_loss_coef: weight of the GIoU loss.
            focal_alpha: alpha of the focal loss (gamma 2).
            loss_types: subset of ("labels", "boxes"): which terms to compute.
            aux_loss: supervise the intermediate decoder layers too (matching, denoising and
                positive queries); otherwise only the last layer.
            interm_loss_coef: extra factor on the encoder-proposal (`interm_outputs`) losses.
            no_interm_box_loss: only the class loss for the encoder proposals.
            cls_loss_type: `focal` (sigmoid focal loss on one-hot targets, `focal_alpha`, gamma
                2) or `quality_focal` (IoU of the detached predicted box with its gt as the target
                of the positive entry, beta 2; Co-DINO). The matcher's class cost is focal in
                both cases.
            interm_class_agnostic: match and supervise the encoder proposals with every gt
                labelled 0 (Deformable DETR's class-agnostic proposals, `class_agnostic` in
                `codetr.model.two_stage`), else with the gt classes.
        """
        super().__init__()
        unknown = set(loss_types) - set(LOSS_TYPES)
        if unknown:
            raise ValueError(f"unknown loss_types {sorted(unknown)}; supported: {LOSS_TYPES}")
        if cls_loss_type not in CLS_LOSS_TYPES:
            raise ValueError(f"unknown cls_loss_type {cls_loss_type!r}; "
                             f"supported: {CLS_LOSS_TYPES}")
        self.cls_loss_type = cls_loss_type
        self.num_classes = num_classes
        self.matcher = matcher
        self.cls_loss_coef = cls_loss_coef
        self.bbox_loss_coef = bbox_loss_coef
        self.giou_loss_coef = giou_loss_coef
        self.focal_alpha = focal_alpha
        self.loss_types = list(loss_types)
        self.aux_loss = aux_loss
        self.interm_loss_coef = interm_loss_coef
        self.no_interm_box_loss = no_interm_box_loss
        self.interm_class_agnostic = interm_class_agnostic

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Computes every loss term whose outputs are present (missing keys are skipped).

        Args:
            outputs: `CoDETR.forward` dict: `pred_logits` `[B, Q, C]` raw logits and `pred_boxes`
                `[B, Q, 4]` cxcywh normalised; optionally `aux_outputs` (list of such dicts),
                `interm_outputs` (one such dict), `dn_outputs` (such a dict plus `aux_outputs`
                and `dn_meta` {num_groups, max_gt, pad_size}), `pos_outputs` (list over co-heads
                of {"layers": list over decoder layers of such dicts [B, N, ...], "targets":
                {labels [B, N] int64 (num_classes = background), boxes [B, N, 4] cxcywh}}) and
                `co_losses` (dict of already weighted scalars).
            targets: B dicts with `labels` `[N_i]` int64 and `boxes` `[N_i, 4]` cxcywh normalised.

        Returns:
            Weighted scalar loss terms, float32.
        """
        device = outputs["pred_logits"].device
        targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)}
                   for t in targets]
        losses: dict[str, Tensor] = {}
        # Losses in float32 whatever the autocast region of the caller: focal and GIoU terms
        # lose their small values in half precision.
        with torch.autocast(device_type=device.type, enabled=False):
            local_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)),
                                       device=device)
            num_boxes = _global_count(local_boxes)
            self._matched(losses, outputs, targets, num_boxes, "", 1.0, True)
            if self.aux_loss:
                for layer, aux in enumerate(outputs.get("aux_outputs", [])):
                    self._matched(losses, aux, targets, num_boxes, f"_{layer}", 1.0, True)
            if "interm_outputs" in outputs:
                interm_targets = targets if not self.interm_class_agnostic else [
                    dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
                self._matched(losses, outputs["interm_outputs"], interm_targets, num_boxes, "_interm",
                              self.interm_loss_coef, not self.no_interm_box_loss)
            if "dn_outputs" in outputs:
                self._denoising(losses, outputs["dn_outputs"], targets, num_boxes)
            for head, pos in enumerate(outputs.get("pos_outputs", [])):
                self._positive(losses, pos, head)
        for name, value in outputs.get("co_losses", {}).items():
            if name in losses:
                raise ValueError(f"co_losses term {name!r} collides with a query-head loss name")
            losses[name] = value
        return losses

    def loss_terms(self, pred_logits: Tensor, pred_boxes: Tensor, assignment: Assignment,
                   normalizer: Tensor, with_boxes: bool, num_layers: int = 1) -> dict[str, Tensor]:
        """Unweighted loss terms of one group of queries under a fixed assignment.

        Args:
            pred_logits: `[B, Q, C]` raw logits.
            pred_boxes: `[B, Q, 4]` cxcywh normalised.
            assignment: which query is supervised by which gt (see `Assignment`).
            normalizer: scalar the sums are divided by (number of gt boxes / positives).
            with_boxes: compute `loss_bbox` and `loss_giou` (if "boxes" is in loss_types).
            num_layers: `L` layers stacked on the batch axis (`[L*B, Q, ...]`, layer-major, the
                assignment's entries layer-major too, equally many per layer): each term is
                then `[L]`, one sum per layer.

        Returns:
            `loss_ce` (focal or quality focal loss summed over queries and classes), `loss_bbox`
            (L1 summed over coordinates) and `loss_giou` (sum of 1 - GIoU), each divided by
            `normalizer` (scalars, or `[L]` with `num_layers`).
        """
        def total(values: Tensor) -> Tensor:
            return values.sum() if num_layers == 1 else values.reshape(num_layers, -1).sum(1)

        if pred_logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {pred_logits.shape[-1]} classes, the criterion "
                             f"was built for {self.num_classes}")
        batch_idx, query_idx, tgt_labels, tgt_boxes = assignment
        src = pred_boxes[batch_idx, query_idx].float()  # [K, 4] cxcywh
        tgt = tgt_boxes.float().detach()  # [K, 4] cxcywh
        src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)
        terms = {}
        if "labels" in self.loss_types:
            logits = pred_logits.float()
            targets = torch.zeros_like(logits)  # [B, Q, C]
            if self.cls_loss_type == "quality_focal":
                iou = elementwise_box_iou(src_xyxy.detach(), tgt_xyxy)[0]
                targets[batch_idx, query_idx, tgt_labels] = iou.to(targets.dtype)
                loss = quality_focal_loss(logits, targets, beta=2.0)
            else:
                targets[batch_idx, query_idx, tgt_labels] = 1.0
                loss = sigmoid_focal_loss(logits, targets, self.focal_alpha, gamma=2.0)
            terms["loss_ce"] = total(loss) / normalizer
        if "boxes" in self.loss_types and with_boxes:
            terms["loss_bbox"] = total(F.l1_loss(src, tgt, reduction="none")) / normalizer
            giou = elementwise_generalized_box_iou(src_xyxy, tgt_xyxy)
            terms["loss_giou"] = total(1 - giou) / normalizer
        return terms

    def _add(self, losses: dict[str, Tensor], terms: dict[str, Tensor], suffix: str,
             scale: float) -> None:
        """Weights `terms` and stores them under `name + suffix`."""
        weights = {"loss_ce": self.cls_loss_coef, "loss_bbox": self.bbox_loss_coef,
                   "loss_giou": self.giou_loss_coef}
        for name, value in terms.items():
            losses[name + suffix] = value * (weights[name] * scale)

    def _matched(self, losses: dict[str, Tensor], group: dict[str, Tensor],
                 targets: list[dict[str, Tensor]], num_boxes: Tensor, suffix: str, scale: float,
                 with_boxes: bool) -> None:
        """Losses of matching queries: Hungarian assignment, normalised by the gt count."""
        indices = self.matcher(group["pred_logits"], group["pred_boxes"], targets)
        assignment = hungarian_assignment(indices, targets, group["pred_logits"].device)
        terms = self.loss_terms(group["pred_logits"], group["pred_boxes"], assignment,
                                num_boxes, with_boxes)
        self._add(losses, terms, suffix, scale)

    def _denoising(self, losses: dict[str, Tensor], dn_outputs: dict,
                   targets: list[dict[str, Tensor]], num_boxes: Tensor) -> None:
        """Losses of the denoising queries at the last (and earlier) decoder layers."""
        meta = dn_outputs["dn_meta"]
        assignment = denoising_assignment(meta, targets, dn_outputs["pred_logits"].device)
        # Each of the G groups holds one positive copy of every gt (DINO: num_boxes * scalar).
        normalizer = num_boxes * max(int(meta["num_groups"]), 1)
        layers = [(dn_outputs, "_dn")]
        if self.aux_loss:
            layers += [(aux, f"_dn_{layer}")
                       for layer, aux in enumerate(dn_outputs.get("aux_outputs", []))]
        for group, suffix in layers:
            if group["pred_logits"].shape[1] < int(meta["pad_size"]):
                raise ValueError(f"dn_outputs has {group['pred_logits'].shape[1]} queries, "
                                 f"dn_meta says pad_size {meta['pad_size']}")
        per_layer = self._shared_assignment_terms([g for g, _ in layers], assignment, normalizer)
        for terms, (_, suffix) in zip(per_layer, layers):
            self._add(losses, terms, suffix, 1.0)

    def _shared_assignment_terms(self, groups: list[dict[str, Tensor]], assignment: Assignment,
                                 normalizer: Tensor) -> list[dict[str, Tensor]]:
        """`loss_terms` of several decoder layers that share one assignment, in one pass.

        The layers are stacked on the batch axis (and the assignment repeated with the batch
        offset), so ~25 small ops run once instead of once per layer; each layer's terms are
        the same sums (up to summation order).
        """
        if len(groups) == 1:
            return [self.loss_terms(groups[0]["pred_logits"], groups[0]["pred_boxes"], assignment,
                                    normalizer, True)]
        num, batch = len(groups), groups[0]["pred_logits"].shape[0]
        batch_idx, query_idx, labels, boxes = assignment
        offset = (torch.arange(num, device=batch_idx.device) * batch).repeat_interleave(
            len(batch_idx), output_size=num * len(batch_idx))
        stacked = (batch_idx.repeat(num) + offset, query_idx.repeat(num), labels.repeat(num),
                   boxes.repeat(num, 1))
        terms = self.loss_terms(torch.cat([g["pred_logits"] for g in groups]),
                                torch.cat([g["pred_boxes"] for g in groups]), stacked,
                                normalizer, True, num_layers=num)
        return [{name: value[k] for name, value in terms.items()} for k in range(num)]

    def _positive(self, losses: dict[str, Tensor], pos: dict, head: int) -> None:
        """Losses of one co-head's customized positive queries, every decoder layer."""
        layers = pos["layers"]
        assignment = positive_assignment(pos["targets"], self.num_classes)
        normalizer = _global_count(torch.tensor(float(len(assignment[0])),
                                                device=assignment[0].device))
        last = len(layers) - 1
        chosen = range(len(layers)) if self.aux_loss else [last]
        per_layer = self._shared_assignment_terms([layers[k] for k in chosen], assignment,
                                                  normalizer)
        for layer, terms in zip(chosen, per_layer):
            self._add(losses, terms, f"_pos{head}_{layer}", 1.0)
