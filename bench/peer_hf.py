"""The HF transformers peer of the learning bench: two-stage Deformable DETR in its strongest form.

`DeformableDetrForObjectDetection` (transformers 5.x, `two_stage=True, with_box_refine=True`) is
built offline with our sizes and wrapped so that it speaks our model contract (docs/DESIGN.md):
`forward(images, masks, targets) -> {pred_logits, pred_boxes[, aux_outputs, interm_outputs]}`.
Three fixes make it a fair peer:

(a) its own loss ignores the encoder proposals of two-stage selection: `peer_criterion` trains it
    with OUR `SetCriterion` (final layer, every earlier decoder layer and the encoder proposals).
    HF picks the proposals by the logit of class 0 (Deformable DETR's class-agnostic two-stage
    rule), so the proposal term uses class-agnostic targets, as the original Deformable DETR does.
(b) prior-probability class bias `-log((1 - 0.01) / 0.01)` on every class head and the last layer
    of every box MLP zeroed (Deformable DETR's init; HF leaves a normal init).
(c) HF swaps every `nn.BatchNorm2d` of the backbone for a frozen copy. With timm's EfficientNet
    that also DROPS THE ACTIVATION fused into timm's `BatchNormAct2d` (ReLU6 after every BN): the
    trunk becomes nearly linear. We put back timm's own trainable modules with the frozen copy's
    statistics and affine parameters, so the trunk is the very network our `Backbone` runs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

import timm
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codetr.boxes import inverse_sigmoid  # noqa: E402
from codetr.losses.criterion import SetCriterion  # noqa: E402
from codetr.model.builder import build_criterion  # noqa: E402
from codetr.model.backbone import NATIVE_CNN_SLOTS, timm_model_name  # noqa: E402
from codetr.model.pretrained import LoadReport, load_backbone_weights  # noqa: E402
from codetr.spec.schema import ExperimentSpec  # noqa: E402

PRIOR_PROB = 0.01


def timm_out_indices(timm_name: str, slots: list[int]) -> list[int]:
    """timm `features_only` indices of our pyramid slots (slot k = stride 2^(k+2)), as `Backbone`.

    Only the native slots (< 4) are returned; the rest are extra stride-2 levels, which both
    models add after the trunk.
    """
    with torch.device("meta"):
        probe = timm.create_model(timm_name, pretrained=False, features_only=True)
    stages = [i for i, r in enumerate(probe.feature_info.reduction()) if r >= 4]
    return [stages[s] for s in slots if s < NATIVE_CNN_SLOTS]


def hf_config(spec: ExperimentSpec, num_classes: int):
    """The `DeformableDetrConfig` with our sizes: width, depth, queries, levels, points, dropout."""
    from transformers import DeformableDetrConfig

    m = spec.model
    name = timm_model_name(m.backbone)
    backbone_config = {"model_type": "timm_backbone", "backbone": name, "num_channels": 3,
                       "features_only": True, "use_pretrained_backbone": False,
                       "out_indices": timm_out_indices(name, list(m.return_interm_indices))}
    return DeformableDetrConfig(
        num_labels=num_classes, two_stage=True, with_box_refine=True, d_model=m.hidden_dim,
        encoder_layers=m.enc_layers, decoder_layers=m.dec_layers,
        encoder_attention_heads=m.nheads, decoder_attention_heads=m.nheads,
        encoder_ffn_dim=m.dim_feedforward, decoder_ffn_dim=m.dim_feedforward,
        num_queries=m.num_queries, two_stage_num_proposals=m.num_queries,
        num_feature_levels=m.num_feature_levels, encoder_n_points=m.enc_n_points,
        decoder_n_points=m.dec_n_points, dropout=m.dropout_ratio, focal_alpha=m.focal_alpha,
        backbone_config=backbone_config)


def unfreeze_batch_norm(body: nn.Module, timm_name: str, out_indices: list[int]) -> dict[str, int]:
    """Fix (c): every frozen BN of HF's trunk becomes timm's own module again, stats copied.

    A fresh timm features model of the same architecture supplies the original modules
    (`BatchNormAct2d`: BN + its activation); its BN buffers and affine parameters are overwritten
    with the frozen copy's (they hold the loaded weights when weights were loaded before).

    Returns:
        `{"replaced": N, "with_activation": M}`: M of the N restored modules carry an activation
        that HF's replacement had dropped.
    """
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrFrozenBatchNorm2d)

    original = timm.create_model(timm_name, pretrained=False, features_only=True,
                                 out_indices=tuple(out_indices))
    frozen = [(n, mod) for n, mod in body.named_modules()
              if isinstance(mod, DeformableDetrFrozenBatchNorm2d)]
    with_act = 0
    for name, mod in frozen:
        bn = original.get_submodule(name)
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != mod.weight.numel():
            raise ValueError(f"timm {timm_name} has {type(bn).__name__} at {name}, not a "
                             f"BatchNorm2d of {mod.weight.numel()} features")
        with torch.no_grad():
            bn.weight.copy_(mod.weight)
            bn.bias.copy_(mod.bias)
            bn.running_mean.copy_(mod.running_mean)
            bn.running_var.copy_(mod.running_var)
        act = getattr(bn, "act", None)
        with_act += int(act is not None and not isinstance(act, nn.Identity))
        body.set_submodule(name, bn)
    return {"replaced": len(frozen), "with_activation": with_act}


def prior_init(detr: nn.Module) -> int:
    """Fix (b): class biases at the 1% prior, last box-MLP layer zero; returns the heads touched.

    The decoder's `class_embed`/`bbox_embed` lists are distinct modules whose parameters HF ties
    to the top-level ones (the encoder head is `decoder.class_embed[-1]`); heads are counted by
    their first parameter, so each is initialised once.
    """
    bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
    heads = {id(next(h.parameters())): h
             for lst in (detr.class_embed, detr.bbox_embed, detr.model.decoder.class_embed,
                         detr.model.decoder.bbox_embed) for h in lst}
    with torch.no_grad():
        for head in heads.values():
            if isinstance(head, nn.Linear):
                head.bias.fill_(bias)
            else:
                nn.init.zeros_(head.layers[-1].weight)
                nn.init.zeros_(head.layers[-1].bias)
    return len(heads)


class PeerDetector(nn.Module):
    """HF Deformable DETR behind our model contract.

    The trunk is registered first as `backbone.body`, so `named_parameters()` names it like ours
    and `codetr.tasks.optim.build_param_groups` gives it `lr_backbone`; HF's deformable attention
    also has `sampling_offsets`, which gets the same `lr_linear_proj_mult` as ours.

    Args:
        detr: a `DeformableDetrForObjectDetection` with `two_stage` and `with_box_refine`.
    """

    def __init__(self, detr: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = detr.model.backbone.model
        self.detr = detr

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """Runs HF's model and maps its outputs to ours.

        Args:
            images: float `[B, 3, H, W]` normalised, zero-padded.
            masks: bool `[B, H, W]`, True on padding (HF's `pixel_mask` is 1 on valid pixels).
            targets: only its presence matters (training outputs when training).

        Returns:
            `pred_logits` `[B, Q, C]` raw logits, `pred_boxes` `[B, Q, 4]` cxcywh normalised (last
            decoder layer); when training with targets also `aux_outputs` (earlier decoder
            layers, same keys) and `interm_outputs` (`pred_logits` `[B, S, C]`, `pred_boxes`
            `[B, S, 4]`: the encoder proposals of all S memory positions, as Deformable DETR
            supervises them; invalid positions have box 1.0, out of HF's +inf logits).
        """
        out = self.detr(pixel_values=images, pixel_mask=(~masks).long())
        hidden = out.intermediate_hidden_states  # [B, L, Q, D]
        refs = out.intermediate_reference_points  # [B, L, Q, 4] cxcywh, refined after layer l
        layers = []
        # HF's own head loop (only its last layer is returned without HF's loss): layer l refines
        # the box it started from, the initial proposals for l = 0.
        for level in range(hidden.shape[1]):
            ref = out.init_reference_points if level == 0 else refs[:, level - 1]
            logits = self.detr.class_embed[level](hidden[:, level])
            delta = self.detr.bbox_embed[level](hidden[:, level])
            layers.append({"pred_logits": logits,
                           "pred_boxes": (delta + inverse_sigmoid(ref)).sigmoid()})
        result = dict(layers[-1])
        if self.training and targets is not None:
            result["aux_outputs"] = layers[:-1]
            result["interm_outputs"] = {"pred_logits": out.enc_outputs_class,
                                        "pred_boxes": out.enc_outputs_coord_logits.sigmoid()}
        return result


def peer_criterion(spec: ExperimentSpec, num_classes: int) -> SetCriterion:
    """Fix (a): our `SetCriterion` of `spec` with class-agnostic encoder proposals.

    The decoder groups are supervised as ours. HF selects the top-k proposals by the class-0
    logit, so that logit must mean "object": the proposals (`interm_outputs`, every location) are
    matched and supervised with every gt labelled 0 (`model.encoder_proposal_classes:
    class_agnostic`, the original Deformable DETR's rule), weighted as ours (`interm_loss_coef`,
    `no_interm_box_loss`, suffix `_interm`).
    """
    model = dataclasses.replace(spec.model, encoder_proposal_classes="class_agnostic")
    return build_criterion(dataclasses.replace(spec, model=model), num_classes)


@torch.no_grad()
def check_wiring(peer: PeerDetector, spec: ExperimentSpec) -> dict[str, float]:
    """Max |difference| of two identities the bench relies on (both 0 when wired right).

    `trunk`: the peer's trunk against our `Backbone` of the same spec holding the same weights
    (fix (c) restored the very network). `last_layer`: `PeerDetector`'s mapped last decoder
    layer against HF's own `logits`/`pred_boxes`. Random inputs with padding, eval mode, from a
    private generator (the global RNG is left alone).
    """
    from codetr.model.backbone import Backbone

    m = spec.model
    ours = Backbone(m.backbone, list(m.return_interm_indices))
    ours.body.load_state_dict(peer.backbone.body.state_dict())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=gen)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, 40:, :] = True
    masks[1, :, 64:] = True
    was_training = peer.training
    peer.eval()
    ours.eval()
    trunk = max(float((a - b).abs().max()) for a, b in zip(ours(images), peer.backbone.body(images)))
    mapped = peer(images, masks)
    hf = peer.detr(pixel_values=images, pixel_mask=(~masks).long())
    peer.train(was_training)
    last = max(float((mapped["pred_logits"] - hf.logits).abs().max()),
               float((mapped["pred_boxes"] - hf.pred_boxes).abs().max()))
    return {"trunk": trunk, "last_layer": last}


def build_peer(spec: ExperimentSpec, num_classes: int) -> tuple[PeerDetector, dict]:
    """The peer with fixes (b) and (c), and our pretrained trunk when the spec has one.

    Args:
        spec: read for the sizes (`model`) and `model.pretrained_backbone_path`.
        num_classes: class logits.

    Returns:
        `(model, info)`; info has `bn` (see `unfreeze_batch_norm`), `prior_heads` and, with a
        pretrained trunk, `load` (the `LoadReport` as loaded/missing/unexpected key lists).
    """
    from transformers import DeformableDetrForObjectDetection

    config = hf_config(spec, num_classes)
    detr = DeformableDetrForObjectDetection(config)
    body = detr.model.backbone.model
    timm_name = config.backbone_config.backbone
    info: dict = {"bn": unfreeze_batch_norm(body, timm_name, list(config.backbone_config.out_indices))}
    info["prior_heads"] = prior_init(detr)
    path = spec.model.pretrained_backbone_path
    if path:
        report: LoadReport = load_backbone_weights(body, path)
        info["load"] = {"loaded": len(report.loaded), "missing": report.missing,
                        "unexpected": report.unexpected,
                        "mismatched": [k for k, _, _ in report.mismatched]}
    if not spec.model.train_backbone:
        raise ValueError("the learning bench compares trainable trunks: model.train_backbone "
                         "must be true")
    return PeerDetector(detr), info
