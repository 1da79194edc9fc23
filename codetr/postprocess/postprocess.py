"""Detections from the query head's outputs: top-k over queries x classes, optional soft-NMS."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from codetr.boxes import box_cxcywh_to_xyxy
from codetr.postprocess.soft_nms import METHODS, batched_soft_nms


def image_sizes(items: Sequence[Mapping]) -> Tensor:
    """`[B, 2]` float32 (h, w) of each original image (`orig_size` of a target / meta): the
    bounds `PostProcess` clamps pixel boxes to (`clip_sizes`).

    With `test_padding: lsj` the boxes are scaled by the larger canvas frame (`detection_size`),
    so a box on the padding would otherwise reach past the image.
    """
    return torch.stack([torch.as_tensor(d["orig_size"]).float() for d in items])


class PostProcess(nn.Module):
    """Turns `pred_logits`/`pred_boxes` into per-image detections in original-image pixels.

    Scores are the sigmoid of the logits; the top `num_select` (query, class) pairs of the
    flattened `Q * C` scores are kept (a query may appear with several classes), label =
    index % C, query = index // C, as DINO/Co-DINO. DETR-style heads need no NMS; Co-DINO's
    optional per-class soft-NMS is applied afterwards when enabled.
    """

    def __init__(self, num_select: int, soft_nms_enabled: bool, soft_nms_method: str,
                 soft_nms_iou_threshold: float, soft_nms_sigma: float) -> None:
        """Builds the post-processor.

        Args:
            num_select: number of (query, class) pairs kept per image before soft-NMS.
            soft_nms_enabled: apply per-class soft-NMS to the selected detections.
            soft_nms_method: "linear" or "gaussian".
            soft_nms_iou_threshold: linear soft-NMS decays overlaps above this IoU.
            soft_nms_sigma: gaussian soft-NMS width.
        """
        super().__init__()
        if num_select <= 0:
            raise ValueError(f"num_select must be > 0, got {num_select}")
        if soft_nms_method not in METHODS:
            raise ValueError(f"soft_nms_method {soft_nms_method!r} is not one of {METHODS}")
        self.num_select = num_select
        self.soft_nms_enabled = soft_nms_enabled
        self.soft_nms_method = soft_nms_method
        self.soft_nms_iou_threshold = soft_nms_iou_threshold
        self.soft_nms_sigma = soft_nms_sigma

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], orig_sizes: Tensor,
                clip_sizes: Optional[Tensor] = None) -> list[dict[str, Tensor]]:
        """Post-processes the model outputs (docs/DESIGN.md contract).

        Args:
            outputs: dict with `pred_logits` `[B, Q, C]` raw logits and `pred_boxes` `[B, Q, 4]`
                cxcywh normalised (other keys are ignored).
            orig_sizes: `[B, 2]` (h, w) the normalised boxes are scaled by: the original images'
                size, or the LSJ `detection_size` frame.
            clip_sizes: `[B, 2]` (h, w) the pixel boxes are clamped to (`image_sizes`); default
                `orig_sizes`.

        Returns:
            See `detections`.
        """
        return self.detections(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes, clip_sizes)

    @torch.no_grad()
    def detections(self, pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor,
                   clip_sizes: Optional[Tensor] = None) -> list[dict[str, Tensor]]:
        """Top-k selection (batched), scaling to pixels and optional soft-NMS (per image).

        Args:
            pred_logits: `[B, Q, C]` raw logits.
            pred_boxes: `[B, Q, 4]` cxcywh normalised (by the frame `orig_sizes` describes).
            orig_sizes: `[B, 2]` (h, w) pixels the normalised boxes are scaled by.
            clip_sizes: `[B, 2]` (h, w) of the original images, the clamp bounds; default
                `orig_sizes`.

        Returns:
            B dicts: `scores` `[K]` float32 descending, `labels` `[K]` int64 model label indices,
            `boxes` `[K, 4]` xyxy pixels of the original image, clamped to `clip_sizes`.
            K = min(num_select, Q * C), fewer after soft-NMS.
        """
        batch, num_queries, num_classes = pred_logits.shape
        prob = pred_logits.float().sigmoid().flatten(1)  # [B, Q * C]
        k = min(self.num_select, num_queries * num_classes)
        scores, index = prob.topk(k, dim=1)  # [B, K], sorted descending
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index % num_classes
        boxes = box_cxcywh_to_xyxy(pred_boxes.float())
        boxes = boxes.gather(1, query[..., None].expand(batch, k, 4))  # [B, K, 4]
        h, w = orig_sizes.to(boxes).unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]  # [B, 1, 4]
        ch, cw = (orig_sizes if clip_sizes is None else clip_sizes).to(boxes).unbind(1)
        bound = torch.stack([cw, ch, cw, ch], dim=1)[:, None, :]  # [B, 1, 4]
        # Clamping to (w, h, w, h) bounds x by the width and y by the height in one op.
        boxes = torch.minimum(boxes * scale, bound).clamp(min=0)
        results = []
        for i in range(batch):
            image_scores, image_labels, image_boxes = scores[i], labels[i], boxes[i]
            if self.soft_nms_enabled:
                keep, image_scores = batched_soft_nms(
                    image_boxes, image_scores, image_labels, self.soft_nms_method,
                    self.soft_nms_iou_threshold, self.soft_nms_sigma)
                image_labels, image_boxes = image_labels[keep], image_boxes[keep]
            results.append({"scores": image_scores, "labels": image_labels,
                            "boxes": image_boxes})
        return results
