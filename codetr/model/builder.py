"""Where the spec meets the constructors: the only module that reads `spec.model`."""
from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

from codetr.losses.criterion import SetCriterion
from codetr.losses.matcher import HungarianMatcher
from codetr.model.atss_head import CoATSSHead
from codetr.model.backbone import Backbone
from codetr.model.codetr import CoDETR
from codetr.model.neck import ChannelMapper
from codetr.model.position_encoding import PositionEmbeddingSine
from codetr.model.query_head import QueryHead
from codetr.model.roi_head import CoStandardRoIHead
from codetr.model.rpn_head import RPNHead
from codetr.postprocess.postprocess import PostProcess
from codetr.spec.schema import ExperimentSpec


def build_model(spec: ExperimentSpec, num_classes: int, load_pretrained_backbone: bool = True,
                trained_state: Optional[Mapping[str, Tensor]] = None) -> CoDETR:
    """The Co-DETR model of `spec.model` with `num_classes` class logits.

    Args:
        spec: the experiment spec (`model` and `train.activation_checkpoint` are read).
        num_classes: class logits (`LabelMap.num_classes`).
        load_pretrained_backbone: load `model.pretrained_backbone_path` (False when the weights
            come from a full checkpoint anyway).
        trained_state: the weights that will be loaded (a restored checkpoint's), for choices
            the spec leaves to the weights (`vit_large_codetr`'s MLP).
    """
    m = spec.model
    backbone = Backbone(
        name=m.backbone,
        return_interm_indices=list(m.return_interm_indices),
        train_backbone=m.train_backbone,
        dilation=m.dilation,
        pretrained_path=m.pretrained_backbone_path if load_pretrained_backbone else None,
        activation_checkpoint=spec.train.activation_checkpoint,  # Swin/FAN/ViT blocks (with_cp)
        variant_state=trained_state,
        frozen_bn=m.backbone_frozen_bn,
    )
    neck = ChannelMapper(list(backbone.out_channels), m.hidden_dim, backbone.num_extra_levels)
    strides = list(backbone.strides)
    for _ in range(backbone.num_extra_levels):
        strides.append(strides[-1] * 2)
    query_head = QueryHead(
        num_classes=num_classes, hidden_dim=m.hidden_dim, nheads=m.nheads,
        num_feature_levels=m.num_feature_levels, enc_layers=m.enc_layers, dec_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward, dropout=m.dropout_ratio, enc_n_points=m.enc_n_points,
        dec_n_points=m.dec_n_points, num_queries=m.num_queries, two_stage_type=m.two_stage_type,
        embed_init_tgt=m.embed_init_tgt, decoder_sa_type=m.decoder_sa_type,
        fix_refpoints_hw=m.fix_refpoints_hw, pre_norm=m.pre_norm, use_dn=m.use_dn,
        dn_number=m.dn_number, dn_box_noise_scale=m.dn_box_noise_scale,
        dn_label_noise_ratio=m.dn_label_noise_ratio,
        # One positive-query projection per co-head: the Faster R-CNN head's first (mmdet).
        num_co_heads=m.num_co_heads + int(m.use_rcnn_co_head),
        activation_checkpoint=spec.train.activation_checkpoint,
        decoder_query_pos=m.decoder_query_pos,
        with_coord_feat=m.with_coord_feat,
        proposal_classes=m.encoder_proposal_classes,
    )
    co_heads = [
        CoATSSHead(num_classes=num_classes, in_channels=m.hidden_dim, num_levels=m.num_feature_levels + 1,
                   stacked_convs=m.co_head_num_convs, octave_base_scale=atss_anchor_scale(spec))
        for _ in range(m.num_co_heads)
    ]
    rpn_head, roi_head = None, None
    if m.use_rcnn_co_head:
        # RPN on the L memory levels + the extra stride-2 level, RoI head on the L levels only.
        rpn_head = RPNHead(m.hidden_dim, strides + [strides[-1] * 2])
        roi_head = CoStandardRoIHead(num_classes, m.hidden_dim, strides,
                                     fc_channels=rcnn_fc_channels(m.hidden_dim),
                                     finest_scale=rcnn_finest_scale(strides[0]))
    position = PositionEmbeddingSine(m.hidden_dim // 2, m.pe_temperatureH, m.pe_temperatureW,
                                     offset=m.pe_offset)
    return CoDETR(backbone, neck, position, query_head, co_heads, strides,
                  co_head_loss_weight=m.co_head_loss_weight, focal_alpha=m.focal_alpha,
                  rpn_head=rpn_head, roi_head=roi_head)


def rcnn_finest_scale(first_stride: int) -> float:
    """The RoI level mapping's scale: 56 over levels from stride 4 (Co-DINO's config), 112 from
    stride 8 (Sense-X's Co-Deformable-DETR config), i.e. 14 x the finest RoI level's stride."""
    return 14.0 * first_stride


def rcnn_fc_channels(hidden_dim: int) -> int:
    """Width of the RoI head's shared FCs: Co-DINO's 1024 at hidden_dim 256, scaled with the width.

    No spec key (TAO has none); the scaling keeps small models small: at hidden_dim 64 a
    1024-wide head has 4.3M parameters (64*7*7*1024 + 1024*1024), a 256-wide one 0.87M.
    """
    return 4 * hidden_dim


def atss_anchor_scale(spec: ExperimentSpec) -> int:
    """ATSS anchor side in strides: 8 at COCO resolution (Co-DINO), scaled with the training size.

    Anchors of 8 strides suit 800-1024 px images. At 128 px they would cover the whole image, and
    the positive queries, whose reference boxes are these anchors, would start saturated
    (sigmoid(inverse_sigmoid(~1)) has no gradient): they never learned in the memorisation test.
    """
    aug = spec.dataset.augmentation
    size = aug.fixed_random_crop or max(aug.scales)
    return int(min(8, max(1, round(8 * size / 800))))


def build_criterion(spec: ExperimentSpec, num_classes: int) -> SetCriterion:
    """The query-head losses of `spec.model` (co-head losses come weighted from the model)."""
    m = spec.model
    matcher = HungarianMatcher(cost_class=m.cls_loss_coef, cost_bbox=m.bbox_loss_coef,
                               cost_giou=m.giou_loss_coef, focal_alpha=m.focal_alpha)
    # TAO's cls_loss_coef is the matching cost and, as in DINO, the loss weight; Co-DINO weighs its
    # QFL 1.0 under a cost of 2.0, which `cls_loss_weight` says (README, "Training parity").
    cls_weight = m.cls_loss_coef if m.cls_loss_weight is None else m.cls_loss_weight
    return SetCriterion(num_classes=num_classes, matcher=matcher, cls_loss_coef=cls_weight,
                        bbox_loss_coef=m.bbox_loss_coef, giou_loss_coef=m.giou_loss_coef,
                        focal_alpha=m.focal_alpha, loss_types=list(m.loss_types), aux_loss=m.aux_loss,
                        interm_loss_coef=m.interm_loss_coef, no_interm_box_loss=m.no_interm_box_loss,
                        cls_loss_type=m.cls_loss_type,
                        interm_class_agnostic=m.encoder_proposal_classes == "class_agnostic")


def build_postprocess(spec: ExperimentSpec) -> PostProcess:
    """Top-k selection and optional soft-NMS of `spec.model`."""
    m = spec.model
    return PostProcess(num_select=m.num_select, soft_nms_enabled=m.soft_nms_enabled,
                       soft_nms_method=m.soft_nms_method, soft_nms_iou_threshold=m.soft_nms_iou_threshold,
                       soft_nms_sigma=m.soft_nms_sigma)
