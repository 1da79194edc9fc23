"""Co-DETR's `with_coord_feat`: positive queries that also embed their co-head's anchor feature.

There is no numerical reference of this path (the mmdet reference is Co-DINO, whose configs
all set it off), so each step is checked against a transcription of Sense-X's source
(`projects/models/transformer.py` `CoDeformableDetrTransformer.forward_aux` /
`CoDinoTransformer.forward_aux`, `co_deformable_detr_head.py` `get_aux_targets`,
`co_roi_head.py`), or against an independent reading of the same tensors:

- the query embedding: content + `pos_feats_norm[k](pos_feats_trans[k](feat))`, positional
  query + `head_pos_embed.weight[k]` (Co-Deformable-DETR only);
- the ATSS features: each positive's row of its level's map at its anchor (found by the anchor
  box, not by our flattening); the R-CNN features: each kept RoI's pooled 7x7 mean;
- `build_positive_queries` draws the features with the boxes (subsampling and padding);
- the joint decoder call equals the own pass with features; every new parameter trains; the
  features are not detached (they train the encoder, as mmdet's);
- the checkpoint importer renumbers the new keys as mmdet's co-head order requires.

Float32 throughout. Tolerances: exact (assert_close's float32 default, 1.3e-6 relative) where the
same operations run; 1e-5 for the joint decoder call (its masked self-attention sums in another
order); 1e-4 absolute for boxes scaled back to pixels (values up to ~100, float32 rounding).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from codetr.boxes import box_cxcywh_to_xyxy, inverse_sigmoid
from codetr.losses.atss_loss import PositiveSamples
from codetr.model.builder import build_criterion, build_model
from codetr.model.positive_queries import build_positive_queries
from codetr.spec import load_spec
from codetr.zoo.mmdet_keys import HEAD_POS_EMBED, map_key, map_value
from test_co_deformable_detr import PROPOSAL, RECIPE, TRAIN, mmdet_proposal_pos_embed
from test_model import TINY, random_batch
from tiny_detector import loss_fell, train_losses

COORD = ["model.with_coord_feat=true"]


def tiny_model(*extra):
    return build_model(load_spec(None, TINY + list(extra)), num_classes=3).train()


def test_without_a_co_head_the_spec_refuses_it():
    from codetr.spec import SpecError

    with pytest.raises(SpecError, match="with_coord_feat=false"):
        load_spec(None, COORD + ["model.num_co_heads=0"])
    assert load_spec(None, COORD + ["model.num_co_heads=0", "model.use_rcnn_co_head=true"])


def test_recipe_and_defaults():
    with torch.device("meta"):
        recipe = build_model(load_spec(RECIPE), num_classes=91, load_pretrained_backbone=False)
        default = build_model(load_spec(None), num_classes=91, load_pretrained_backbone=False)
    tr = recipe.query_head.transformer
    assert tr.with_coord_feat
    assert [tuple(m.weight.shape) for m in tr.pos_feats_trans] == [(256, 256)] * 2  # R-CNN, ATSS
    assert [tuple(m.weight.shape) for m in tr.pos_feats_norm] == [(256,)] * 2
    assert tuple(tr.head_pos_embed.weight.shape) == (2, 1)  # Sense-X's Embedding(K, 1, ...)
    assert not default.query_head.transformer.with_coord_feat  # every official Co-DINO config
    assert not any("pos_feats" in k or "head_pos_embed" in k for k in default.state_dict())


@pytest.mark.parametrize("proposal", [True, False])
def test_query_embedding_is_sense_x_forward_aux(proposal):
    """Co-Deformable-DETR: query_pos, query = split(LN(Linear(pos_embed(anchor)))), then
    query += LN_k(Linear_k(feat)), query_pos += head_pos_embed.weight[k]. Co-DINO: query =
    LN(Linear(pos_embed(anchor))) + LN_k(Linear_k(feat)) and no positional query."""
    torch.manual_seed(0)
    model = tiny_model("model.num_co_heads=2", *COORD, *(PROPOSAL[:2] if proposal else []))
    tr = model.query_head.transformer
    with torch.no_grad():
        for p in [*tr.pos_feats_norm.parameters(), *tr.aux_pos_trans_norm.parameters()]:
            p.normal_()  # LayerNorm affine off its identity init
    anchors = torch.rand(2, 7, 4) * 0.8 + 0.1
    feats = torch.randn(2, 7, tr.hidden_dim)
    k = 1
    clamped = inverse_sigmoid(anchors).sigmoid()  # get_proposal_pos_embed(inverse_sigmoid(a))
    out = tr.aux_pos_trans_norm[k](tr.aux_pos_trans[k](mmdet_proposal_pos_embed(clamped, tr.hidden_dim // 2)))
    extra = tr.pos_feats_norm[k](tr.pos_feats_trans[k](feats))
    if proposal:
        query_pos, query = out.split(tr.hidden_dim, dim=2)
        torch.testing.assert_close(tr.positive_query_pos(clamped, k), query_pos + tr.head_pos_embed.weight[k])
    else:
        query = out
        assert tr.positive_query_pos(clamped, k) is None and tr.head_pos_embed is None
    torch.testing.assert_close(tr.positive_content(clamped, k, feats), query + extra)
    with pytest.raises(ValueError, match="missing"):
        tr.positive_content(clamped, k)
    plain = tiny_model("model.num_co_heads=2").query_head.transformer
    with pytest.raises(ValueError, match="given"):
        plain.positive_content(clamped, k, feats)


def _row_at_anchor(maps, strides, scale, b, box):
    """The map cell under an anchor box, from the box alone: its side gives the level (ATSS
    anchors are `scale * stride` squares), its centre over the stride the (y, x) cell (mmdet's
    anchor centres sit at the cells' top-left corners: centre offset 0)."""
    side = float(box[2] - box[0])
    level = [round(scale * s) for s in strides].index(round(side))
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    x, y = round(cx / strides[level]), round(cy / strides[level])
    return maps[level][b, :, y, x]


def test_atss_features_are_the_map_rows_at_the_anchors():
    torch.manual_seed(2)
    model = tiny_model(*COORD)
    head = model.bbox_head[0]
    images, _, targets = random_batch()
    maps = [torch.randn(2, 32, s, s * 3 // 2, requires_grad=True) for s in (8, 4, 2, 1)]
    strides = [8, 16, 32, 64]
    _, positives = head.loss_and_positives(maps, strides, targets, with_feats=True)
    scale = head.octave_base_scale
    for b, p in enumerate(positives):
        assert p.feats.shape == (p.anchors.shape[0], 32) and p.feats.requires_grad  # not detached
        assert p.neg_rows.shape == (p.neg_anchors.shape[0],) and p.neg_feats.requires_grad
        for box, feat in zip(p.anchors, p.feats):
            torch.testing.assert_close(feat, _row_at_anchor(maps, strides, scale, b, box))
        for i in torch.randperm(p.neg_anchors.shape[0])[:20]:
            torch.testing.assert_close(p.neg_feats[p.neg_rows[i]],
                                       _row_at_anchor(maps, strides, scale, b, p.neg_anchors[i]))
    _, plain = head.loss_and_positives(maps, strides, targets)
    assert all(p.feats is None and p.neg_feats is None for p in plain)


def test_rcnn_features_are_the_kept_rois_pooled_means():
    """co_roi_head: `bbox_results['bbox_feats'].mean(-1).mean(-1)[idx]` for the first `keep`
    sampled RoIs of each image (positives first)."""
    torch.manual_seed(3)
    model = tiny_model(*COORD, "model.use_rcnn_co_head=true")
    roi_head = model.roi_head[0]
    maps = [torch.randn(2, 32, s, s * 3 // 2, requires_grad=True) for s in (16, 8, 4)]
    gt = [torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 5.0, 90.0, 40.0]]),
          torch.tensor([[20.0, 20.0, 80.0, 60.0]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    proposals = [torch.cat([g + torch.randn(30, 4) * 4 for g in gts]) for gts in gt]
    proposals = [torch.cat([p, torch.rand(200, 4).sort(1).values * 90]) for p in proposals]
    torch.manual_seed(4)
    _, positives, samples = roi_head.loss_and_positives(maps, proposals, gt, labels, with_feats=True)
    for b, (p, s) in enumerate(zip(positives, samples)):
        kept = torch.cat((p.anchors, p.neg_anchors))
        rois = torch.cat((torch.full((kept.shape[0], 1), float(b)), kept), 1)
        pooled = roi_head.bbox_roi_extractor(maps, rois).mean(-1).mean(-1)
        torch.testing.assert_close(torch.cat((p.feats, p.neg_feats[p.neg_rows])), pooled)
        assert p.feats.requires_grad and p.neg_feats.requires_grad  # they train the encoder
        torch.testing.assert_close(p.anchors, s.boxes[:p.anchors.shape[0]])


def _samples_with_feats(num_pos, num_neg, dim=6):
    """Anchors whose feature encodes their own box (feat[:4] = box), so a draw can be checked;
    the negatives' features sit at shuffled rows of a larger table (`neg_rows`), as ATSS's."""
    def boxes(n):
        xy = torch.rand(n, 2) * 40
        return torch.cat((xy, xy + 5 + torch.rand(n, 2) * 30), 1)

    pos, neg = boxes(num_pos), boxes(num_neg)
    code = lambda b: torch.cat((b, torch.randn(b.shape[0], dim - 4)), 1)  # noqa: E731
    table = torch.randn(num_neg + 17, dim)
    rows = torch.randperm(table.shape[0])[:num_neg]
    table[rows] = code(neg)
    return PositiveSamples(anchors=pos, labels=torch.randint(0, 3, (num_pos,)), gt_boxes=pos + 1,
                           neg_anchors=neg, feats=code(pos), neg_feats=table, neg_rows=rows)


@pytest.mark.parametrize("num_pos,max_queries", [(3, 300), (40, 16)])
def test_features_follow_their_boxes_through_subsampling_and_padding(num_pos, max_queries):
    h, w = 80.0, 96.0
    samples = [_samples_with_feats(num_pos, 50), _samples_with_feats(5, 50)]
    sizes = torch.tensor([[h, w], [h, w]])
    boxes, _, feats = build_positive_queries(samples, sizes, 3, max_queries=max_queries,
                                             generator=torch.Generator().manual_seed(5))
    assert feats.shape[:2] == boxes.shape[:2] and feats.shape[2] == 6
    xyxy = box_cxcywh_to_xyxy(boxes) * torch.tensor([w, h, w, h])
    torch.testing.assert_close(feats[..., :4], xyxy, rtol=1e-5, atol=1e-4)
    _, _, none = build_positive_queries([PositiveSamples(s.anchors, s.labels, s.gt_boxes, s.neg_anchors)
                                         for s in samples], sizes, 3)
    assert none is None
    mixed = [samples[0], PositiveSamples(samples[1].anchors, samples[1].labels, samples[1].gt_boxes,
                                         samples[1].neg_anchors)]
    with pytest.raises(ValueError, match="features"):
        build_positive_queries(mixed, sizes, 3)


def test_an_image_without_negatives_pads_with_zero_features():
    sample = _samples_with_feats(2, 1)
    lone = PositiveSamples(sample.anchors, sample.labels, sample.gt_boxes, sample.neg_anchors[:0],
                           sample.feats, sample.neg_feats, sample.neg_rows[:0])
    boxes, targets, feats = build_positive_queries([lone], torch.tensor([[80.0, 96.0]]), 3)
    assert boxes.shape[1] == 9 and torch.equal(targets["labels"][0, 2:], torch.full((7,), 3))
    torch.testing.assert_close(feats[0, :2], sample.feats)
    assert torch.equal(feats[0, 2:], torch.zeros(7, 6))


def test_joint_call_equals_the_own_pass_with_features():
    torch.manual_seed(6)
    model = tiny_model(*COORD, *PROPOSAL)
    head = model.query_head
    images, masks, targets = random_batch()
    feats = model.neck(model.backbone(images))
    level_masks = [F.interpolate(masks[None].float(), size=f.shape[-2:]).bool()[0] for f in feats]
    prepared = head.prepare(feats, level_masks, [model.position_encoding(m) for m in level_masks], targets)
    boxes, pos_feats = torch.rand(2, 9, 4) * 0.5 + 0.2, torch.randn(2, 9, 32)
    _, joint = head.finish(prepared, [boxes], [pos_feats])
    alone = head.forward_positive(prepared["memory"], boxes, 0, pos_feats)
    for a, b in zip(joint[0], alone):
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    _, without = head.finish(prepared, [boxes], [torch.zeros_like(pos_feats)])
    assert not torch.allclose(without[0][-1]["pred_logits"], joint[0][-1]["pred_logits"])


@pytest.mark.parametrize("extra", [PROPOSAL + ["model.use_rcnn_co_head=true"], []])
def test_every_new_parameter_trains(extra):
    """One step of the whole model: the new parameters get gradients, and no parameter is left
    without one (DDP would refuse an unused parameter)."""
    torch.manual_seed(7)
    spec = load_spec(None, TINY + COORD + extra)
    model = build_model(spec, num_classes=3).train()
    images, masks, targets = random_batch()
    criterion = build_criterion(spec, num_classes=3)
    sum(criterion(model(images, masks, targets), targets).values()).backward()
    tr = model.query_head.transformer
    names = [n for n, _ in tr.named_parameters() if "pos_feats" in n or "head_pos_embed" in n]
    assert names and all(p.grad is not None and p.grad.abs().sum() > 0
                         for n, p in tr.named_parameters() if n in names)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_co_deformable_detr_with_coord_feat_trains():
    losses = train_losses(TRAIN + PROPOSAL + COORD + ["model.use_rcnn_co_head=true"])
    assert all(math.isfinite(v) for v in losses) and loss_fell(losses), losses


def test_checkpoint_keys_follow_mmdets_co_head_order():
    for name in ("pos_feats_trans", "pos_feats_norm"):
        key = f"query_head.transformer.{name}.1.weight"
        assert map_key(key, True) == (key, "")
        assert map_key(key, False) == (f"query_head.transformer.{name}.0.weight", "")
        assert map_key(f"query_head.transformer.{name}.0.bias", False)[0] is None  # the R-CNN's
    rows = torch.randn(2, 1)
    assert torch.equal(map_value(HEAD_POS_EMBED, rows, True), rows)
    assert torch.equal(map_value(HEAD_POS_EMBED, rows, False), rows[1:])
    other = torch.randn(3, 1)
    assert map_value("query_head.transformer.level_embeds", other, False) is other


@pytest.mark.parametrize("rcnn", [True, False])
def test_an_official_co_deformable_detr_state_dict_imports_its_new_keys(rcnn):
    """An official-layout state dict (both co-heads: R-CNN 0, ATSS 1) into our model with or
    without the R-CNN co-head: the ATSS head's projections and scalar land in our slot."""
    from codetr.zoo.importer import import_official

    with torch.device("meta"):
        full = build_model(load_spec(RECIPE), num_classes=91, load_pretrained_backbone=False).state_dict()
        ours = build_model(load_spec(RECIPE, [f"model.use_rcnn_co_head={str(rcnn).lower()}"]),
                           num_classes=91, load_pretrained_backbone=False).state_dict()
    prefix = "query_head.transformer."
    official = {k: torch.randn(v.shape) for k, v in full.items()
                if k.startswith(prefix + "pos_feats") or k == HEAD_POS_EMBED}
    mapped, report = import_official(official, ours, "synthetic")
    assert not report.mismatched and not report.unexpected
    slot = 0 if not rcnn else 1
    torch.testing.assert_close(mapped[HEAD_POS_EMBED], official[HEAD_POS_EMBED] if rcnn
                               else official[HEAD_POS_EMBED][1:])
    torch.testing.assert_close(mapped[f"{prefix}pos_feats_trans.{slot}.weight"],
                               official[f"{prefix}pos_feats_trans.1.weight"])
