"""RoI head of the Faster R-CNN co-head (mmdet's `CoStandardRoIHead` + `Shared2FCBBoxHead`,
training only).

Pools the sampled proposals from the encoder memory maps, classifies them (C + 1 softmax) and
regresses class-specific boxes; its losses train the encoder, and its positive RoIs become the
decoder's customized positive queries (Co-DINO's positive-query head 0). Names follow mmdet
(`bbox_head.shared_fcs.{0,1}`, `bbox_head.fc_cls`, `bbox_head.fc_reg`; the extractor has no
parameters) so official `roi_head.0.*` weights load 1:1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.losses.atss_loss import PositiveSamples
from codetr.losses.random_sampler import RandomSampler
from codetr.losses.roi_loss import RoISamples, batch_rois, roi_losses, sample_rois
from codetr.model.roi_extractor import RoIExtractor

# mmdet's CoStandardRoIHead hands at most this many sampled RoIs per image to the queries.
_MAX_POSITIVE_ROIS = 2000


class Shared2FCBBoxHead(nn.Module):
    """Flatten, two shared FC + ReLU, then class logits and class-specific box deltas.

    Args:
        in_channels: channels `D` of the pooled features.
        roi_size: pooled side (7).
        fc_channels: width of the shared FCs (Co-DINO: 1024).
        num_classes: `C` (the logits are C + 1, index C the background).
    """

    def __init__(self, in_channels: int, roi_size: int, fc_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi_size * roi_size, fc_channels),
                                         nn.Linear(fc_channels, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        # mmdet's init: Xavier-uniform shared FCs, N(0, 0.01) classifier, N(0, 0.001) regressor.
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        """`[K, D, s, s]` pooled features -> `(cls_logits [K, C + 1], deltas [K, 4C])`; the
        deltas of class c are columns 4c..4c+3 (DeltaXYWH, stds (0.1, 0.1, 0.2, 0.2))."""
        x = roi_feats.flatten(1)  # channel-major, as mmdet
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class CoStandardRoIHead(nn.Module):
    """RoI extraction + `Shared2FCBBoxHead` + sampling, losses and positives.

    Args:
        num_classes: `C`.
        in_channels: channels `D` of the maps.
        strides: strides of the maps it pools from (the L memory levels).
        fc_channels: width of the shared FCs (1024 in Co-DINO).
        roi_size: RoIAlign output side (7).
        finest_scale: RoI level mapping scale (56).
    """

    def __init__(self, num_classes: int, in_channels: int, strides: Sequence[int],
                 fc_channels: int = 1024, roi_size: int = 7, finest_scale: float = 56.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.bbox_roi_extractor = RoIExtractor(strides, roi_size, finest_scale)
        self.bbox_head = Shared2FCBBoxHead(in_channels, roi_size, fc_channels, num_classes)
        # 512 RoIs per image, a quarter positive at most; an attribute so a test can inject draws.
        self.sampler = RandomSampler(num=512, pos_fraction=0.25)

    def forward(self, feats: Sequence[Tensor], rois: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pools and predicts.

        Args:
            feats: maps `[B, D, H_l, W_l]`, one per stride.
            rois: `[K, 5]` (batch index, x1, y1, x2, y2) pixels.

        Returns:
            `(roi_feats [K, D, 7, 7], cls_logits [K, C + 1], deltas [K, 4C])`.
        """
        roi_feats = self.bbox_roi_extractor(feats, rois)
        cls_logits, deltas = self.bbox_head(roi_feats)
        return roi_feats, cls_logits, deltas

    def loss_and_positives(self, feats: Sequence[Tensor], proposals: Sequence[Tensor],
                           gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                           with_feats: bool = False
                           ) -> tuple[dict[str, Tensor], list[PositiveSamples], list[RoISamples]]:
        """Samples RoIs, runs the head, its losses and the positives for the queries.

        Args:
            feats: maps `[B, D, H_l, W_l]`, one per stride.
            proposals: per image `[P_i, 4]` xyxy pixels (detached RPN proposals).
            gt_boxes: per image `[N_i, 4]` xyxy pixels.
            gt_labels: per image `[N_i]` int64 label indices.
            with_feats: the positives carry each RoI's pooled features averaged over the
                `7 x 7` cells (`[D]`, mmdet's `bbox_feats.mean(-1).mean(-1)`; Co-DETR's
                `with_coord_feat`).

        Returns:
            `(losses, positives, samples)`: unweighted `loss_cls`, `loss_bbox`; per image the
            `PositiveSamples` for the positive queries (pixels: the RoI box itself, its label and
            gt; `neg_anchors` the sampled negative RoIs); per image the `RoISamples`.
        """
        samples = [sample_rois(p.detach(), g, labels, self.num_classes, self.sampler)
                   for p, g, labels in zip(proposals, gt_boxes, gt_labels)]
        rois = batch_rois(samples)
        roi_feats, cls_logits, deltas = self(feats, rois)
        labels = torch.cat([s.labels for s in samples])
        losses = roi_losses(cls_logits, deltas, rois[:, 1:], labels,
                            torch.cat([s.gt_boxes for s in samples]), self.num_classes)
        means = roi_feats.mean((2, 3)) if with_feats else None  # [K, D], RoIs in batch_rois order
        return losses, positive_samples(samples, means), samples


def positive_samples(samples: Sequence[RoISamples], roi_feats: Optional[Tensor] = None
                     ) -> list[PositiveSamples]:
    """What Co-DINO's RoI head hands to the positive queries, per image.

    As mmdet's `CoStandardRoIHead.loss`, every image keeps its first min(2000, fewest sampled
    RoIs of the batch) samples (positives come first, so only surplus negatives are cut, unless
    an image has more positives than that); the positives among them are the queries, the
    negatives their padding pool. `roi_feats`: `[K, D]` per sampled RoI, images in order
    (`batch_rois`), split into `feats` / `neg_feats` the same way; None: no features.
    """
    keep = min([_MAX_POSITIVE_ROIS] + [s.boxes.shape[0] for s in samples])
    per_image = ([None] * len(samples) if roi_feats is None
                 else roi_feats.split([s.boxes.shape[0] for s in samples]))
    out = []
    for s, f in zip(samples, per_image):
        pos = min(s.num_pos, keep)
        out.append(PositiveSamples(anchors=s.boxes[:pos], labels=s.labels[:pos],
                                   gt_boxes=s.gt_boxes[:pos], neg_anchors=s.boxes[pos:keep],
                                   feats=None if f is None else f[:pos],
                                   neg_feats=None if f is None else f[pos:keep],
                                   neg_rows=None if f is None else torch.arange(keep - pos, device=f.device)))
    return out
