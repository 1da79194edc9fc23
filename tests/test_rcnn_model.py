"""The Faster R-CNN co-head inside Co-DETR: numbering, free inference, gradients; its parts
against loop / torchvision references on random inputs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision import ops

from codetr.losses.max_iou_assigner import max_iou_assign
from codetr.losses.random_sampler import RandomSampler
from codetr.model.builder import build_criterion, build_model
from codetr.model.proposals import batched_nms
from codetr.model.roi_extractor import RoIExtractor, roi_levels

from test_model import random_batch, tiny_spec

RCNN = "model.use_rcnn_co_head=true"


def _random_boxes(n, size, gen):
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


def _loop_max_iou(boxes, gts, pos_thr, neg_thr, min_pos, low_quality):
    """mmdet's MaxIoUAssigner written out per box and per gt in Python floats."""
    iou = ops.box_iou(gts, boxes).tolist()  # [G, A]
    out = []
    for a in range(len(boxes)):
        column = [iou[g][a] for g in range(len(gts))]
        best = max(column)
        arg = column.index(best)
        out.append(arg + 1 if best >= pos_thr else 0 if best < neg_thr else -1)
    if low_quality:
        for g, row in enumerate(iou):
            if max(row) >= min_pos:
                for a, value in enumerate(row):
                    if value == max(row):
                        out[a] = g + 1
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(3))
def test_max_iou_assigner_matches_a_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = _random_boxes(300, 100, gen)
    gts = _random_boxes(4, 100, gen)
    boxes[:5] = gts[0]  # exact ties: every copy of gt 0's best box takes gt 0
    for args in ((0.7, 0.3, 0.3, True), (0.5, 0.5, 0.5, False)):
        ours, _ = max_iou_assign(boxes, gts, *args)
        assert torch.equal(ours, _loop_max_iou(boxes, gts, *args))


def test_sampler_quotas_and_order():
    assigned = torch.cat([torch.full((300,), -1), torch.zeros(1000, dtype=torch.long),
                          torch.arange(1, 201)])[torch.randperm(1500)]
    pos, neg = RandomSampler(256, 0.5)(assigned)
    assert pos.numel() == 128 and neg.numel() == 128
    assert bool((assigned[pos] > 0).all()) and bool((assigned[neg] == 0).all())
    assert torch.equal(pos, pos.sort().values) and torch.equal(neg, neg.sort().values)
    few = torch.tensor([1, 0, 0, -1, 2])
    pos, neg = RandomSampler(512, 0.25)(few)
    assert pos.tolist() == [0, 4] and neg.tolist() == [1, 2]


def test_batched_nms_equals_torchvision_as_sets():
    gen = torch.Generator().manual_seed(0)
    boxes = _random_boxes(500, 80, gen)
    scores = torch.rand(500, generator=gen)
    groups = torch.randint(0, 4, (500,), generator=gen)
    ours = batched_nms(boxes, scores, groups, 0.5)
    assert set(ours.tolist()) == set(ops.batched_nms(boxes, scores, groups, 0.5).tolist())
    assert bool((scores[ours][1:] <= scores[ours][:-1]).all())


def test_roi_levels_and_pooling_match_torchvision_roi_align():
    # scale (sqrt area) just below / at the level boundaries 112, 224, 448, 896
    sides = torch.tensor([10.0, 111.9, 112.0, 223.9, 224.0, 448.0, 896.0, 5000.0])
    rois = torch.cat([torch.zeros(8, 1), torch.zeros(8, 2), sides[:, None], sides[:, None]], 1)
    assert roi_levels(rois, 5).tolist() == [0, 0, 1, 1, 2, 3, 4, 4]
    feats = [torch.randn(2, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    rois = torch.tensor([[0, 3.0, 4.0, 30.0, 40.0], [1, 0.0, 0.0, 150.0, 120.0], [1, 5.0, 5.0, 9.0, 9.0]])
    pooled = RoIExtractor([4, 8, 16, 32, 64])(feats, rois)
    for roi, level, out in zip(rois, roi_levels(rois, 5), pooled):
        expected = ops.roi_align(feats[level], roi[None], 7, 1 / 2 ** (level + 2), 0, aligned=True)[0]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_numbering_rcnn_first_then_atss(monkeypatch):
    spec = tiny_spec("model.num_co_heads=1", RCNN)
    model = build_model(spec, num_classes=3).train()
    assert len(model.query_head.transformer.aux_pos_trans) == 2
    seen = []
    # The positive queries of every head are embedded with their own aux_pos_trans[k] (then
    # decoded in the matching queries' decoder call, codetr/model/joint_queries.py).
    original = model.query_head.transformer.positive_content
    monkeypatch.setattr(model.query_head.transformer, "positive_content",
                        lambda boxes, k, feats=None: seen.append(k) or original(boxes, k, feats))
    images, masks, targets = random_batch()
    out = model(images, masks, targets)
    assert seen == [0, 1]
    assert set(out["co_losses"]) == {"loss_rpn_cls_co0", "loss_rpn_bbox_co0", "loss_roi_cls_co0",
                                     "loss_roi_bbox_co0", "loss_cls_co1", "loss_bbox_co1",
                                     "loss_centerness_co1"}
    losses = build_criterion(spec, num_classes=3)(out, targets)
    assert {"loss_ce_pos0_0", "loss_giou_pos0_1", "loss_ce_pos1_1"} <= set(losses)
    # The R-CNN positives are gts and proposals: every query of head 0 with a real label has a
    # target box overlapping its reference box.
    assert (out["pos_outputs"][0]["targets"]["labels"] < 3).any()


def test_rcnn_losses_reach_the_encoder_and_every_rcnn_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_spec("model.num_co_heads=0", RCNN), num_classes=3).train()
    images, masks, targets = random_batch()
    # Boxes of 24-40 px: the smallest RPN anchors are 32 px (stride 8 x 4), so every image has
    # RPN positives and rpn_reg gets a gradient (tiny random boxes may have none).
    for t in targets:
        t["boxes"] = torch.tensor([[0.4, 0.5, 0.4, 0.5], [0.6, 0.4, 0.5, 0.6]])
        t["labels"] = torch.tensor([0, 2])
    out = model(images, masks, targets)
    sum(v for k, v in out["co_losses"].items() if k.endswith("_co0")).backward()
    enc = [p.grad for p in model.query_head.transformer.encoder.parameters() if p.grad is not None]
    assert enc and sum(float(g.abs().sum()) for g in enc) > 0
    for name, p in list(model.rpn_head.named_parameters()) + list(model.roi_head.named_parameters()):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_rcnn_head_costs_nothing_at_inference():
    torch.manual_seed(0)
    atss = build_model(tiny_spec("model.num_co_heads=1"), num_classes=3).eval()
    torch.manual_seed(0)
    full = build_model(tiny_spec("model.num_co_heads=1", RCNN), num_classes=3).eval()
    keys = set(full.state_dict())
    assert any(k.startswith("rpn_head.") for k in keys) and any(k.startswith("roi_head.0.") for k in keys)
    assert not any(k.startswith(("rpn_head", "roi_head")) for k in atss.state_dict())

    def inference(model):
        return {n: tuple(p.shape) for n, p in model.named_parameters()
                if not n.startswith(("bbox_head.", "rpn_head.", "roi_head.", "query_head.downsample"))
                and ".aux_pos_trans" not in n}
    assert inference(full) == inference(atss)
    images, masks, _ = random_batch()
    flops = []
    for model in (atss, full):
        with FlopCounterMode(display=False) as counter:
            out = model(images, masks)
        flops.append(counter.get_total_flops())
        assert set(out) == {"pred_logits", "pred_boxes"}
    assert flops[0] == flops[1] > 0


def test_off_by_default_keeps_atss_numbering():
    model = build_model(tiny_spec("model.num_co_heads=2"), num_classes=3).train()
    assert model.rpn_head is None and model.roi_head is None
    assert len(model.query_head.transformer.aux_pos_trans) == 2
    out = model(*random_batch()[:2], random_batch()[2])
    assert {"loss_cls_co0", "loss_cls_co1"} <= set(out["co_losses"])
    assert not any("rpn" in k or "roi" in k for k in out["co_losses"])


def test_positives_keep_the_batch_minimum_of_samples_as_mmdet():
    from codetr.losses.roi_loss import RoISamples
    from codetr.model.roi_head import positive_samples

    def samples(num, num_pos):
        boxes = torch.arange(num * 4, dtype=torch.float32).reshape(num, 4)
        labels = torch.full((num,), 3)
        labels[:num_pos] = 1
        empty = torch.zeros(0, dtype=torch.long)
        return RoISamples(boxes, labels, boxes.clone(), num_pos, empty, empty, empty)

    a, b = samples(512, 40), samples(30, 35 - 30 + 3)  # b: 8 positives, 22 negatives
    out = positive_samples([a, b])
    assert [p.anchors.shape[0] for p in out] == [30, 8]  # a's 40 positives cut to the 30 kept
    assert out[0].neg_anchors.shape[0] == 0 and out[1].neg_anchors.shape[0] == 22
    assert torch.equal(out[1].anchors, b.boxes[:8]) and torch.equal(out[1].neg_anchors, b.boxes[8:])


def test_spec_key_defaults_off_and_rejects_non_booleans():
    from codetr.spec import SpecError, load_spec

    assert load_spec(None, []).model.use_rcnn_co_head is False
    with pytest.raises(SpecError, match="model.use_rcnn_co_head"):
        load_spec(None, ["model.use_rcnn_co_head=maybe"])
