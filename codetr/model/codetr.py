"""Co-DINO, as in the paper's figure.

    image -> backbone -> neck -> query head (encoder -> two-stage selection -> decoder + denoising)
                                  |                                       -> one-to-one detections
                                  '- encoder memory as maps -> Faster R-CNN co-head (optional)
                                  |                            + ATSS co-heads (one-to-many) [train]
                                        '- their positives -> customized positive queries
                                           through the same decoder                          [train]

At inference only backbone, neck and query head run: the co-heads cost nothing there.
State-dict prefixes follow the official checkpoints: `backbone.*`, `neck.*`, `query_head.*`,
`bbox_head.{k}.*` (the ATSS co-heads), `rpn_head.*` and `roi_head.0.*` (the Faster R-CNN
co-head, when built). Positive-query heads (`aux_pos_trans.{i}`, loss suffixes `_co{i}`,
`_pos{i}_*`) are numbered as mmdet: the Faster R-CNN head first (0) when present, then the ATSS
heads.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.model.atss_head import CoATSSHead
from codetr.model.backbone import Backbone
from codetr.model.faster_rcnn import RCNN_TERM_WEIGHTS, faster_rcnn_losses
from codetr.model.neck import ChannelMapper
from codetr.model.position_encoding import PositionEmbeddingSine
from codetr.model.positive_queries import build_positive_queries
from codetr.model.query_head import QueryHead
from codetr.model.roi_head import CoStandardRoIHead
from codetr.model.rpn_head import RPNHead

# Relative weights of the ATSS terms (mmdet's ATSS config: GIoU x2), times co_head_loss_weight.
ATSS_TERM_WEIGHTS = {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0}


class CoDETR(nn.Module):
    """Co-DETR with a DINO query head and `len(bbox_head)` collaborative ATSS heads.

    Args:
        backbone: image -> multi-scale features.
        neck: features -> `hidden_dim` maps, extra stride-2 levels.
        position_encoding: padding mask -> sine position maps.
        query_head: the DETR head (transformer, branches, denoising, positive-query pass).
        bbox_head: the ATSS co-heads (empty list: plain DINO).
        level_strides: stride in pixels of each neck level (finest first).
        co_head_loss_weight: multiplies every co-head loss term.
        focal_alpha: focal-loss alpha of the co-heads.
        rpn_head: the Faster R-CNN co-head's RPN (None: ATSS co-heads only, as TAO).
        roi_head: its RoI head (given with `rpn_head`).
    """

    def __init__(self, backbone: Backbone, neck: ChannelMapper, position_encoding: PositionEmbeddingSine,
                 query_head: QueryHead, bbox_head: Sequence[CoATSSHead], level_strides: Sequence[int],
                 co_head_loss_weight: float, focal_alpha: float, rpn_head: Optional[RPNHead] = None,
                 roi_head: Optional[CoStandardRoIHead] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.position_encoding = position_encoding
        self.query_head = query_head
        self.bbox_head = nn.ModuleList(bbox_head)
        self.level_strides = list(level_strides)
        self.co_head_loss_weight = co_head_loss_weight
        self.focal_alpha = focal_alpha
        if (rpn_head is None) != (roi_head is None):
            raise ValueError("the Faster R-CNN co-head needs both rpn_head and roi_head")
        self.rpn_head = rpn_head
        # A list as in mmdet (`roi_head.0.*`), so official checkpoints map 1:1.
        self.roi_head = nn.ModuleList([roi_head]) if roi_head is not None else None

    def forward(self, images: Tensor, masks: Tensor,
                targets: Optional[Sequence[dict[str, Tensor]]] = None) -> dict[str, Any]:
        """Predicts; in training with targets also returns what the losses need.

        Args:
            images: `[B, 3, H, W]` normalised, padded.
            masks: `[B, H, W]` bool, True on padding.
            targets: B dicts (`boxes` cxcywh normalised by `size`, `labels`, `size` (h, w)).

        Returns:
            The query head's outputs (docs/DESIGN.md), plus in training `co_losses` (weighted
            R-CNN and ATSS terms, suffix `_co{i}`) and `pos_outputs` (per co-head i, R-CNN
            first: `{"layers": [...], "targets": {...}}`).
        """
        feats = self.neck(self.backbone(images))
        level_masks = [F.interpolate(masks[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in feats]
        level_pos = [self.position_encoding(m).to(f.dtype) for m, f in zip(level_masks, feats)]
        prepared = self.query_head.prepare(feats, level_masks, level_pos, targets)
        if not (self.training and targets is not None and (len(self.bbox_head) > 0 or self.rpn_head is not None)):
            out = self.query_head.finish(prepared)[0]
            out.pop("memory")
            return out
        co_losses, pos_boxes, pos_targets, pos_feats = self._collaborative(prepared["memory"], targets)
        # The positive queries of every co-head share the matching queries' decoder call
        # (codetr/model/joint_queries.py): the same results as separate passes, less overhead.
        out, pos_layers = self.query_head.finish(prepared, pos_boxes, pos_feats)
        out.pop("memory")
        out["co_losses"] = co_losses
        out["pos_outputs"] = [{"layers": layers, "targets": t} for layers, t in zip(pos_layers, pos_targets)]
        return out

    def _collaborative(self, memory, targets: Sequence[dict[str, Tensor]]
                       ) -> tuple[dict[str, Tensor], list[Tensor], list[dict[str, Tensor]],
                                  list[Optional[Tensor]]]:
        """One-to-many co-head supervision of the encoder, and each head's positive queries.

        Returns:
            `(co_losses, pos_boxes, pos_targets, pos_feats)`: the weighted co-head terms (suffix
            `_co{k}`), per co-head k (R-CNN first) the `[B, N_k, 4]` cxcywh positive boxes, their
            targets and (`with_coord_feat`, else None) their `[B, N_k, D]` features
            (`build_positive_queries`).
        """
        maps = self.query_head.aux_feature_maps(memory)
        strides = self.level_strides + [self.level_strides[-1] * 2]
        sizes = torch.stack([t["size"] for t in targets]).to(maps[0].device)
        co_losses: dict[str, Tensor] = {}
        heads: list[tuple[dict[str, Tensor], list, dict[str, float]]] = []
        with_feats = self.query_head.transformer.with_coord_feat
        if self.rpn_head is not None:  # positive-query head 0, as in mmdet
            heads.append((*faster_rcnn_losses(self.rpn_head, self.roi_head[0], maps, targets, with_feats),
                          RCNN_TERM_WEIGHTS))
        for head in self.bbox_head:
            heads.append((*head.loss_and_positives(maps, strides, targets, focal_alpha=self.focal_alpha,
                                                   with_feats=with_feats), ATSS_TERM_WEIGHTS))
        pos_boxes, pos_targets, pos_feats = [], [], []
        for k, (losses, positives, weights) in enumerate(heads):
            for name, value in losses.items():
                co_losses[f"{name}_co{k}"] = value * weights[name] * self.co_head_loss_weight
            boxes, boxes_targets, feats = build_positive_queries(positives, sizes, self.query_head.num_classes)
            pos_boxes.append(boxes)
            pos_targets.append(boxes_targets)
            pos_feats.append(feats)
        return co_losses, pos_boxes, pos_targets, pos_feats
