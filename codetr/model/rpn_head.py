"""Region proposal network of the Faster R-CNN co-head (mmdet's `RPNHead`, training only).

Runs on the same maps as the ATSS co-heads (encoder memory as maps plus the extra level, not
detached): its objectness and box losses train the encoder, and its proposals feed the RoI head.
Layer names follow mmdet (`rpn_conv`, `rpn_cls`, `rpn_reg`) so official `rpn_head.*` weights
load 1:1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.losses.random_sampler import RandomSampler
from codetr.losses.rpn_loss import rpn_losses
from codetr.model.anchor_generator import AnchorGenerator
from codetr.model.proposals import rpn_proposals


def flatten_rpn_outputs(cls_logits: Sequence[Tensor], deltas: Sequence[Tensor]
                        ) -> tuple[list[Tensor], list[Tensor]]:
    """Per level `[B, A, H, W]` / `[B, 4A, H, W]` -> `[B, H*W*A]` / `[B, H*W*A, 4]`, rows in
    (y, x, anchor) order like `AnchorGenerator`'s."""
    flat_cls = [c.permute(0, 2, 3, 1).reshape(c.shape[0], -1) for c in cls_logits]
    flat_deltas = [d.permute(0, 2, 3, 1).reshape(d.shape[0], -1, 4) for d in deltas]
    return flat_cls, flat_deltas


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 objectness (A logits) and 1x1 deltas (4A) per level.

    Args:
        in_channels: channels `D` of every input map (also the conv width, as Co-DINO).
        strides: stride in pixels of each input map (Co-DINO: 4 .. 128, six maps).
        octave_base_scale: anchor size in strides of the first scale (4).
        scales_per_octave: anchor scales per octave (3).
        ratios: anchor height / width ratios (0.5, 1, 2).
        train_nms_pre: anchors per level kept before the proposal NMS in training (4000).
        test_nms_pre: the same at test time (`proposals(training=False)`, 1000).
        nms_iou: proposal NMS IoU threshold (0.7).
        max_proposals: proposals kept per image (1000).
    """

    def __init__(self, in_channels: int, strides: Sequence[int], octave_base_scale: float = 4.0,
                 scales_per_octave: int = 3, ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 train_nms_pre: int = 4000, test_nms_pre: int = 1000, nms_iou: float = 0.7,
                 max_proposals: int = 1000) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator(strides, octave_base_scale, scales_per_octave, ratios)
        num_anchors = self.anchor_generator.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(in_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        self.train_nms_pre = train_nms_pre
        self.test_nms_pre = test_nms_pre
        self.nms_iou = nms_iou
        self.max_proposals = max_proposals
        # mmdet's RPN training sampler: 256 anchors per image, half positive at most. An
        # attribute (not a module) so a test can inject the reference's draws.
        self.sampler = RandomSampler(num=256, pos_fraction=0.5)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):  # mmdet: Normal(0, 0.01), bias 0
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Dense predictions on every level.

        Args:
            feats: maps `[B, D, H_l, W_l]`, one per stride.

        Returns:
            `(cls_logits, deltas)`: per level `[B, A, H_l, W_l]` objectness logits and
            `[B, 4A, H_l, W_l]` DeltaXYWH deltas (stds 1; channels 4a..4a+3 belong to anchor a),
            float32 (the deltas are exponentiated when decoded).
        """
        if len(feats) != len(self.anchor_generator.strides):
            raise ValueError(f"expected {len(self.anchor_generator.strides)} maps, got {len(feats)}")
        cls_logits, deltas = [], []
        for feat in feats:
            hidden = F.relu(self.rpn_conv(feat))
            cls_logits.append(self.rpn_cls(hidden).float())
            deltas.append(self.rpn_reg(hidden).float())
        return cls_logits, deltas

    def anchors(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Per level `[H_l * W_l * A, 4]` xyxy pixel anchors for maps `[B, D, H_l, W_l]`."""
        return self.anchor_generator([tuple(f.shape[-2:]) for f in feats], device=feats[0].device)

    @torch.no_grad()
    def proposals(self, cls_logits: Sequence[Tensor], deltas: Sequence[Tensor],
                  anchors: Sequence[Tensor], image_sizes: Sequence[Sequence[int]],
                  training: bool) -> list[tuple[Tensor, Tensor]]:
        """Per image `(boxes [K, 4] xyxy pixels, scores [K])` from (detached) RPN outputs.

        Args:
            cls_logits: `forward`'s objectness logits.
            deltas: `forward`'s deltas.
            anchors: `anchors(feats)`.
            image_sizes: per image `(h, w)` of the unpadded image (proposals are clipped to it).
            training: use the training `nms_pre` (4000) instead of the test one (1000).
        """
        flat_cls, flat_deltas = flatten_rpn_outputs(cls_logits, deltas)
        nms_pre = self.train_nms_pre if training else self.test_nms_pre
        return [rpn_proposals([c[b].detach() for c in flat_cls], [d[b].detach() for d in flat_deltas],
                              anchors, image_sizes[b], nms_pre, self.nms_iou, self.max_proposals)
                for b in range(len(image_sizes))]

    def loss_and_proposals(self, feats: Sequence[Tensor], gt_boxes: Sequence[Tensor],
                           image_sizes: Sequence[Sequence[int]],
                           pad_sizes: Optional[Sequence[Optional[Sequence[int]]]] = None
                           ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """RPN losses and the training proposals (training only).

        Args:
            feats: maps `[B, D, H_l, W_l]`, one per stride.
            gt_boxes: per image `[N_i, 4]` xyxy pixels (one objectness class: no labels).
            image_sizes: per image `(h, w)` of the unpadded image, pixels.
            pad_sizes: per image `(h, w)` padded extent (anchors beyond it are invalid in the
                loss; `rpn_losses`), or None: all valid.

        Returns:
            `(losses, proposals)`: `losses` has `loss_rpn_cls` and `loss_rpn_bbox`, unweighted,
            each `[num_levels]` (their sum is the term; per level as mmdet logs them);
            `proposals` per image `[K, 4]` xyxy pixels, detached.
        """
        cls_logits, deltas = self(feats)
        anchors = self.anchors(feats)
        flat_cls, flat_deltas = flatten_rpn_outputs(cls_logits, deltas)
        losses = rpn_losses(flat_cls, flat_deltas, anchors, gt_boxes, self.sampler, pad_sizes)
        proposals = self.proposals(cls_logits, deltas, anchors, image_sizes, training=True)
        return losses, [boxes for boxes, _ in proposals]
