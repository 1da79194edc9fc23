"""Co-Deformable-DETR: the recipe's model structure, proposal positional queries, training."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from codetr.model.builder import build_model
from codetr.model.proposal_queries import box_queries, xywh_sine_embed
from codetr.spec import SpecError, load_spec
from tiny_detector import loss_fell, train_losses

RECIPE = Path(__file__).resolve().parents[1] / "params" / "co_deformable_detr_r50_1x.yaml"
PROPOSAL = ["model.decoder_query_pos=proposal", "model.use_dn=false", "model.num_co_heads=1"]
TRAIN = ["model.backbone=resnet_18", "train.activation_checkpoint=false"]


def mmdet_proposal_pos_embed(boxes, num_pos_feats=128, temperature=10000):
    """mmdet DeformableDetrTransformer.get_proposal_pos_embed, written from its formula, on
    boxes already in [0, 1]: per coordinate (cx, cy, w, h in that order) interleaved sin/cos."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = boxes[:, :, :, None] * 2 * math.pi / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


def test_proposal_embedding_matches_mmdet_order():
    boxes = torch.rand(2, 5, 4)
    torch.testing.assert_close(xywh_sine_embed(boxes, 128), mmdet_proposal_pos_embed(boxes))


def test_recipe_builds_the_co_deformable_detr_structure():
    spec = load_spec(RECIPE)
    with torch.device("meta"):
        model = build_model(spec, num_classes=91, load_pretrained_backbone=False)
    head = model.query_head
    tr = head.transformer
    assert tr.num_queries == 300 and tr.query_embed.weight.shape == (300, 256)  # mixed selection
    assert isinstance(tr.pos_trans, nn.Linear) and tuple(tr.pos_trans.weight.shape) == (512, 512)
    assert tuple(tr.pos_trans_norm.weight.shape) == (512,)
    # Both official co-heads: positive-query projections 0 (Faster R-CNN) and 1 (ATSS).
    assert [tuple(m.weight.shape) for m in tr.aux_pos_trans] == [(512, 512)] * 2
    assert model.rpn_head is not None and len(model.roi_head) == 1 and model.co_head_loss_weight == 12.0
    # Sense-X's RoI extractor: featmap_strides [8, 16, 32, 64] with finest_scale 112 (Co-DINO: 56 from 4).
    extractor = model.roi_head[0].bbox_roi_extractor
    assert list(extractor.strides) == [8, 16, 32, 64] and extractor.finest_scale == 112.0
    assert tr.decoder.ref_point_head is None and isinstance(tr.decoder.norm, nn.Identity)
    assert head.label_embedding is None and not head.use_dn          # no denoising
    assert len(head.cls_branches) == 7 and len(head.reg_branches) == 7  # 6 layers + proposals
    assert model.backbone.strides == [8, 16, 32] and model.backbone.num_extra_levels == 1
    assert tr.level_embeds.shape == (4, 256) and len(model.bbox_head) == 1
    assert model.position_encoding.temperature_h == model.position_encoding.temperature_w == 10000
    names = set(model.state_dict())
    assert "query_head.transformer.pos_trans.weight" in names
    assert not any(".ref_point_head." in n or "dn_" in n for n in names)


def test_spec_rejects_proposal_positions_with_denoising_or_one_stage():
    with pytest.raises(SpecError, match="use_dn=false"):
        load_spec(None, ["model.decoder_query_pos=proposal"])
    with pytest.raises(SpecError, match="two_stage_type=standard"):
        load_spec(None, ["model.decoder_query_pos=proposal", "model.use_dn=false",
                         "model.two_stage_type='no'"])


@pytest.mark.parametrize("embed_init_tgt", [True, False])
def test_positional_queries_are_the_proposals_and_fixed(embed_init_tgt):
    """Every decoder layer sees the same positional queries: the first half of
    pos_trans_norm(pos_trans(sine(selected proposal))); without mixed selection the content is
    the second half."""
    from test_model import TINY, random_batch

    torch.manual_seed(0)
    spec = load_spec(None, TINY + PROPOSAL + [f"model.embed_init_tgt={str(embed_init_tgt).lower()}"])
    model = build_model(spec, num_classes=3).train()
    images, masks, targets = random_batch()
    tr = model.query_head.transformer
    seen, selected = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[1])))
             for layer in tr.decoder.layers]
    original = tr.select_queries

    def spy(*args):
        out = original(*args)
        selected.append(out)
        return out

    tr.select_queries = spy
    out = model(images, masks, targets)
    for h in hooks:
        h.remove()
    content, reference_unsig, topk = selected[0]
    layers = len(tr.decoder.layers)
    # One decoder call: the matching queries come first, then the positive queries.
    assert len(seen) == layers
    pos, proposal_content = box_queries(reference_unsig.sigmoid(), tr.pos_trans, tr.pos_trans_norm)
    for _, query_pos in seen:
        torch.testing.assert_close(query_pos[:, :pos.shape[1]], pos)
    if embed_init_tgt:
        torch.testing.assert_close(content, tr.query_embed.weight[None].expand_as(content))
    else:
        torch.testing.assert_close(content, proposal_content)
    assert "dn_outputs" not in out and out["pos_outputs"]


@pytest.mark.parametrize("embed_init_tgt,rcnn", [("true", "false"), ("false", "false"), ("true", "true")])
def test_tiny_co_deformable_detr_trains(embed_init_tgt, rcnn):
    losses = train_losses(TRAIN + PROPOSAL + [f"model.embed_init_tgt={embed_init_tgt}",
                                      "model.pe_temperatureH=10000", "model.pe_temperatureW=10000",
                                      "model.pe_offset=-0.5", f"model.use_rcnn_co_head={rcnn}"])
    assert all(math.isfinite(v) for v in losses)
    assert loss_fell(losses), losses


@pytest.mark.parametrize("query_pos, eps", [(PROPOSAL, 1e-5), ([], 1e-3)])
def test_both_decoders_look_forward_twice(query_pos, eps):
    """Sense-X's Co-Deformable-DETR config sets `look_forward_twice=True` (as DINO does): layer
    l's box refines the UNDETACHED box of layer l - 1, so layer 1's box loss reaches layer 0's box
    branch (layer 1's sampling does not: test_transformer's detach test). Only the
    inverse_sigmoid eps differs: Deformable DETR's 1e-5, DINO's 1e-3."""
    from test_model import TINY, random_batch

    torch.manual_seed(1)
    spec = load_spec(None, TINY + query_pos)
    model = build_model(spec, num_classes=3).train()
    head = model.query_head
    for branch in head.reg_branches:  # non-zero deltas so every layer moves its boxes
        nn.init.normal_(branch[-1].weight, std=0.1)
    images, masks, targets = random_batch()
    out = model(images, masks, targets)
    out["pred_boxes"].sum().backward()  # layer 1 of 2
    grad = head.reg_branches[0][-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert head.transformer.decoder.refine_eps == eps
