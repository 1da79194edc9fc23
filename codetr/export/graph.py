"""The exported graphs: the detector's inference path on whole (unpadded) images.

Input contract of every exported model (TAO's: the image only, no mask):

- `images`: float32 `[B, 3, H, W]`, normalised with the spec's `input_mean`/`input_std` (the
  same `codetr.data` transform as evaluation), every pixel valid: the image is resized to exactly
  `H x W` (a fixed size chosen at export) and NOT padded. The padding mask of the PyTorch model is
  built inside the graph as all-False from the input's shape, so the batch stays dynamic.

Outputs of `DetectorGraph` (TAO's contract): `pred_logits` `[B, Q, C]` raw class logits and
`pred_boxes` `[B, Q, 4]` cxcywh normalised by `(W, H)`, as `CoDETR.forward` in eval mode.

`DetectionsGraph` adds the top-k selection of `codetr.postprocess.PostProcess` (without soft-NMS,
which stays outside the graph) and a second input `orig_sizes` `[B, 2]` int64 `(h, w)` of the
original images: outputs `scores` `[B, K]` (sigmoid, descending), `labels` `[B, K]` int64 model
label indices and `boxes` `[B, K, 4]` xyxy pixels of the original image, clamped to it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.boxes import box_cxcywh_to_xyxy
from codetr.model.codetr import CoDETR

RAW_OUTPUTS = ("pred_logits", "pred_boxes")
DETECTION_OUTPUTS = ("scores", "labels", "boxes")


class DetectorGraph(nn.Module):
    """`images [B, 3, H, W]` -> `(pred_logits [B, Q, C], pred_boxes [B, Q, 4] cxcywh)`.

    Args:
        model: the trained detector (put in eval mode; only the query head runs).
    """

    def __init__(self, model: CoDETR) -> None:
        super().__init__()
        self.model = model
        # The whole wrapper in eval mode: torch.onnx.export restores the wrapper's mode on every
        # submodule afterwards, and a wrapper left in train mode would put BatchNorm back into
        # batch statistics.
        self.eval()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # zeros_like keeps B symbolic in the traced graph (a torch.zeros(B, ...) with a Python
        # int B would be baked into the file as a constant).
        masks = torch.zeros_like(images[:, 0], dtype=torch.bool)  # [B, H, W], no padding
        out = self.model(images, masks)
        return out["pred_logits"], out["pred_boxes"]


def topk_detections(pred_logits: Tensor, pred_boxes: Tensor, orig_sizes: Tensor,
                    num_select: int) -> tuple[Tensor, Tensor, Tensor]:
    """`PostProcess`'s batched top-k over queries x classes, in traceable form.

    Args:
        pred_logits: `[B, Q, C]` raw logits.
        pred_boxes: `[B, Q, 4]` cxcywh normalised.
        orig_sizes: `[B, 2]` (h, w) of the original images.
        num_select: K (capped at Q * C).

    Returns:
        `scores [B, K]`, `labels [B, K]` int64, `boxes [B, K, 4]` xyxy pixels clamped to the image.
    """
    num_classes = pred_logits.shape[2]
    k = min(num_select, pred_logits.shape[1] * pred_logits.shape[2])
    prob = pred_logits.float().sigmoid().flatten(1)  # [B, Q * C]
    scores, index = prob.topk(k, dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    labels = index - query * num_classes  # index % C without ONNX Mod's sign rules
    boxes = box_cxcywh_to_xyxy(pred_boxes.float())
    boxes = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))  # [B, K, 4]
    h, w = orig_sizes.to(boxes.dtype).unbind(1)
    scale = torch.stack([w, h, w, h], dim=1)[:, None, :]  # [B, 1, 4]
    boxes = torch.minimum(boxes * scale, scale).clamp(min=0)
    return scores, labels, boxes


class DetectionsGraph(nn.Module):
    """`(images [B, 3, H, W], orig_sizes [B, 2])` -> `(scores, labels, boxes)`; see the module doc.

    Args:
        model: the trained detector.
        num_select: detections kept per image (`model.num_select`).
    """

    def __init__(self, model: CoDETR, num_select: int) -> None:
        super().__init__()
        self.detector = DetectorGraph(model)
        self.num_select = num_select
        self.eval()

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pred_logits, pred_boxes = self.detector(images)
        return topk_detections(pred_logits, pred_boxes, orig_sizes, self.num_select)
