"""Collaborative ATSS head of Co-DETR (training only).

A one-to-many auxiliary head on the encoder memory maps: its dense ATSS supervision trains the
encoder (gradients flow into the maps), and its positive anchors become the decoder's customized
positive queries. Layer names follow mmdet's `ATSSHead` (`cls_convs.{i}.conv|gn`, `atss_cls`,
`atss_reg`, `atss_centerness`, `scales.{l}.scale`) so official `bbox_head.0.*` weights map 1:1.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.losses.atss_loss import PositiveSamples, atss_losses


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of `channels` that is at most `max_groups` (GroupNorm(32) when possible)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class ConvGNReLU(nn.Module):
    """Conv3x3 (no bias: GroupNorm follows) + GroupNorm + ReLU, shape-preserving."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(_num_groups(out_channels), out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C_in, H, W]` -> `[B, C_out, H, W]`."""
        return self.act(self.gn(self.conv(x)))


def _stacked_layer(cls_layer: ConvGNReLU, reg_layer: ConvGNReLU
                   ) -> tuple[Tensor, int, Tensor, Tensor, float]:
    """One tower layer of both towers as one: `(weight, gn_groups, gn_weight, gn_bias, eps)`.

    `weight` `[2D, D, 3, 3]` is the cls layer's filters over the reg layer's: as a plain
    convolution of one `D`-channel map it is both first layers; as a grouped convolution
    (groups 2) of the stacked `2D`-channel map, both deeper layers. GroupNorm(g) of each half is
    GroupNorm(2g) of the stack (its groups split the channels in order).
    """
    cls_gn, reg_gn = cls_layer.gn, reg_layer.gn
    if (cls_gn.num_groups, cls_gn.eps) != (reg_gn.num_groups, reg_gn.eps):
        raise ValueError("the cls and reg towers' GroupNorms differ: cannot stack them")
    return (torch.cat((cls_layer.conv.weight, reg_layer.conv.weight)), 2 * cls_gn.num_groups,
            torch.cat((cls_gn.weight, reg_gn.weight)), torch.cat((cls_gn.bias, reg_gn.bias)),
            cls_gn.eps)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per level: levels share the towers, not the scale)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> same shape."""
        return x * self.scale


def grid_anchors(feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                 octave_base_scale: int, device: torch.device | None = None
                 ) -> list[Tensor]:
    """One square anchor per feature location, as mmdet's `AnchorGenerator` (ratio 1, one scale).

    The anchor of location (y, x) on a level of stride s is centred on (x * s, y * s) (mmdet's
    default centre offset 0, which the official checkpoints were trained with) with side
    `octave_base_scale * s`.

    Args:
        feat_sizes: per level `(H_l, W_l)`.
        strides: per level stride in pixels.
        octave_base_scale: anchor side in units of the stride.
        device: where to build the anchors.

    Returns:
        per level `[H_l * W_l, 4]` float32 xyxy pixels, rows in (y, x) row-major order.
    """
    anchors = []
    for (h, w), stride in zip(feat_sizes, strides):
        ys = torch.arange(h, device=device, dtype=torch.float32) * stride
        xs = torch.arange(w, device=device, dtype=torch.float32) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        half = octave_base_scale * stride / 2
        centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 4)
        anchors.append(centres + centres.new_tensor([-half, -half, half, half]))
    return anchors


class CoATSSHead(nn.Module):
    """ATSS head shared across levels: cls / reg towers, then class, box-delta and centerness."""

    def __init__(self, num_classes: int, in_channels: int, num_levels: int, stacked_convs: int,
                 octave_base_scale: int = 8, prior_prob: float = 0.01) -> None:
        """Builds the head.

        Args:
            num_classes: number of class logits `C` (sigmoid, no background logit).
            in_channels: channels `D` of every input map (also the tower width, as Co-DINO).
            num_levels: number of input maps (one learnable Scale each).
            stacked_convs: Conv3x3 + GN + ReLU blocks per tower (`co_head_num_convs`).
            octave_base_scale: anchor side in strides.
            prior_prob: initial foreground probability of the class logits (focal-loss init).
        """
        super().__init__()
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.octave_base_scale = octave_base_scale
        self.cls_convs = nn.ModuleList(ConvGNReLU(in_channels, in_channels)
                                       for _ in range(stacked_convs))
        self.reg_convs = nn.ModuleList(ConvGNReLU(in_channels, in_channels)
                                       for _ in range(stacked_convs))
        self.atss_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        # mmdet ATSSHead init: N(0, 0.01) convs, zero biases, class bias at the focal prior so
        # the many negatives do not swamp the first iterations.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Dense predictions on every level, the two towers computed as one.

        The same function as `forward_per_tower` (mmdet's layer-by-layer form), arranged for fewer
        and larger kernel calls: the towers' first convolutions read the same map, so they run as
        one convolution with their weights stacked (`2D` output channels; deeper tower layers as
        one grouped convolution, groups 2); each tower's GroupNorm(g) is the stacked map's
        GroupNorm(2g), the groups never straddling the towers; the box-delta and centerness
        convolutions read the same tower output, so they run as one 5-channel convolution. The
        maps are made NCHW-contiguous first on the CPU: oneDNN runs the stacked convolution faster
        on that layout than on the memory's channels-last views (BENCHMARKS.md "Session 9").
        Same values up to float rounding (tests/test_atss_head.py, float64).

        Args:
            feats: `num_levels` maps `[B, D, H_l, W_l]`.

        Returns:
            `(cls_scores, deltas, centerness)`, lists over levels of `[B, C, H_l, W_l]` raw class
            logits, `[B, 4, H_l, W_l]` DeltaXYWH deltas (decode with `delta_xywh_decode` against
            the level's anchors) and `[B, 1, H_l, W_l]` raw centerness logits (the deltas and
            centerness are channel views of one map: not contiguous).
        """
        if len(feats) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} maps, got {len(feats)}")
        tower = [_stacked_layer(cls_layer, reg_layer)
                 for cls_layer, reg_layer in zip(self.cls_convs, self.reg_convs)]
        reg_ctr_weight = torch.cat((self.atss_reg.weight, self.atss_centerness.weight))
        reg_ctr_bias = torch.cat((self.atss_reg.bias, self.atss_centerness.bias))
        width = self.atss_cls.in_channels
        cls_scores, deltas, centerness = [], [], []
        for feat, scale in zip(feats, self.scales):
            # [B, D, H, W], NCHW on the CPU (measured there; other devices keep their layout).
            x = feat.contiguous() if feat.device.type == "cpu" else feat
            for index, (weight, groups, gn_weight, gn_bias, eps) in enumerate(tower):
                # [B, 2D, H, W]: channels [0, D) the cls tower, [D, 2D) the reg tower.
                x = F.conv2d(x, weight, padding=1, groups=1 if index == 0 else 2)
                x = F.relu(F.group_norm(x, groups, gn_weight, gn_bias, eps), inplace=True)
            cls_feat, reg_feat = (x[:, :width], x[:, width:]) if tower else (x, x)
            cls_scores.append(self.atss_cls(cls_feat))
            reg_ctr = F.conv2d(reg_feat, reg_ctr_weight, reg_ctr_bias, padding=1)  # [B, 5, H, W]
            # Float32 like mmdet: the deltas are exponentiated when decoded.
            deltas.append(scale(reg_ctr[:, :4]).float())
            centerness.append(reg_ctr[:, 4:])
        return cls_scores, deltas, centerness

    def forward_per_tower(self, feats: Sequence[Tensor]
                          ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """`forward` layer by layer through the submodules, as mmdet's `ATSSHead.forward_single`.

        The reference of the stacked form (tests, `bench/step_profile.py --parts`); same
        arguments and returns as `forward`.
        """
        if len(feats) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} maps, got {len(feats)}")
        cls_scores, deltas, centerness = [], [], []
        for feat, scale in zip(feats, self.scales):
            cls_feat, reg_feat = feat, feat
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_scores.append(self.atss_cls(cls_feat))
            deltas.append(scale(self.atss_reg(reg_feat)).float())
            centerness.append(self.atss_centerness(reg_feat))
        return cls_scores, deltas, centerness

    def anchors(self, feats: Sequence[Tensor], strides: Sequence[int]) -> list[Tensor]:
        """Per level `[H_l * W_l, 4]` xyxy pixel anchors matching `feats` (`[B, D, H_l, W_l]`).

        Cached per (map sizes, strides, device): a fixed training size builds them once. The
        cache is a plain attribute (not state), a few entries for multi-scale training.
        """
        sizes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in feats)
        key = (sizes, tuple(int(s) for s in strides), str(feats[0].device))
        cache = self.__dict__.setdefault("_anchor_cache", {})
        if key not in cache:
            if len(cache) >= 32:  # multi-scale training: keep the cache bounded
                cache.clear()
            cache[key] = grid_anchors(sizes, strides, self.octave_base_scale, device=feats[0].device)
        return cache[key]

    def loss_and_positives(self, feats: Sequence[Tensor], strides: Sequence[int],
                           targets: Sequence[dict], focal_alpha: float = 0.25,
                           gamma: float = 2.0, per_level: bool = False, with_feats: bool = False
                           ) -> tuple[dict[str, Tensor], list[PositiveSamples]]:
        """Runs the head and its ATSS losses (training only).

        Args:
            feats: `num_levels` maps `[B, D, H_l, W_l]`.
            strides: per level stride in pixels of the input image.
            targets: B dicts with `boxes` `[N, 4]` cxcywh normalised by `size`, `labels` `[N]`
                and `size` `[2]` (h, w) (DESIGN.md data contract).
            focal_alpha: focal loss alpha.
            gamma: focal loss gamma.
            per_level: `[L]` per-level terms instead of scalars (see `atss_losses`).
            with_feats: the positives carry the maps' rows at their anchors (`feats`,
                `neg_feats`: Co-DETR's `with_coord_feat`).

        Returns:
            `(losses, positives)` as `atss_losses`: unweighted `loss_cls`, `loss_bbox`,
            `loss_centerness` and one `PositiveSamples` (pixels) per image.
        """
        if len(strides) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} strides, got {len(strides)}")
        cls_scores, deltas, centerness = self(feats)
        return atss_losses(cls_scores, deltas, centerness, self.anchors(feats, strides),
                           targets, self.num_classes, focal_alpha=focal_alpha, gamma=gamma,
                           per_level=per_level, feature_maps=feats if with_feats else None)
