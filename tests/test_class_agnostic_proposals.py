"""Deformable DETR's class-agnostic encoder proposals (`model.encoder_proposal_classes`).

Reference: Sense-X Co-DETR `CoDeformableDetrTransformer.forward` ranks the proposals by
`enc_outputs_class[..., 0]`, and `CoDeformDETRHead.loss` supervises `enc_outputs_class` /
`enc_outputs_coord` of EVERY location with `binary_labels_list` (all gt labels 0) through the
head's Hungarian assigner and losses. The reference below is written from those formulas with
scipy's assignment and torchvision's focal loss and GIoU, independent of `codetr.losses`.
"""
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from codetr.losses.criterion import SetCriterion
from codetr.losses.matcher import HungarianMatcher
from codetr.model.builder import build_criterion, build_model
from codetr.model.two_stage import proposal_scores, select_topk_proposals
from codetr.spec import SpecError, load_spec
from tiny_detector import loss_fell, train_losses

AGNOSTIC = ["model.encoder_proposal_classes=class_agnostic"]
DEFORMABLE = ["model.decoder_query_pos=proposal", "model.use_dn=false", "model.num_co_heads=1",
              "model.backbone=resnet_18", "train.activation_checkpoint=false"]


def test_selection_ranks_by_class_zero_and_keeps_every_location():
    torch.manual_seed(0)
    memory, proposals = torch.randn(2, 30, 8), torch.randn(2, 30, 4)
    cls, reg = nn.Linear(8, 5), nn.Linear(8, 4)
    logits = cls(memory)
    agnostic = select_topk_proposals(memory, proposals, cls, reg, 6, "class_agnostic")
    per_class = select_topk_proposals(memory, proposals, cls, reg, 6, "per_class")
    want0 = logits[..., 0].topk(6, dim=1).indices
    want_max = logits.max(-1).values.topk(6, dim=1).indices
    assert not torch.equal(want0, want_max)  # the two rules pick differently on these logits
    torch.testing.assert_close(agnostic.logits, logits.gather(1, want0[..., None].expand(-1, -1, 5)))
    torch.testing.assert_close(per_class.logits, logits.gather(1, want_max[..., None].expand(-1, -1, 5)))
    torch.testing.assert_close(agnostic.content, memory.gather(1, want0[..., None].expand(-1, -1, 8)))
    # The loss sees all 30 locations (class_agnostic) or the 6 selected (per_class).
    loss_a, loss_p = agnostic.loss_outputs(), per_class.loss_outputs()
    torch.testing.assert_close(loss_a["pred_logits"], logits)
    torch.testing.assert_close(loss_a["pred_boxes"], (reg(memory) + proposals).sigmoid())
    assert loss_p["pred_logits"].shape == (2, 6, 5) and per_class.all_logits is None
    with pytest.raises(ValueError, match="class_agnostic"):
        proposal_scores(logits, "first")


def _reference_interm_losses(logits, boxes, targets, alpha=0.25, w_cls=2.0, w_l1=5.0, w_giou=2.0):
    """mmdet's loss_single with binary labels: Hungarian on focal(class 0) + L1 + GIoU costs."""
    num_boxes = sum(len(t["boxes"]) for t in targets)
    ce = l1 = giou = 0.0
    target_cls = torch.zeros_like(logits)
    for b, t in enumerate(targets):
        prob = logits[b, :, 0].sigmoid()[:, None]  # every gt is class 0
        pos = alpha * (1 - prob) ** 2 * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob ** 2 * -(1 - prob + 1e-8).log()
        pred_xyxy = box_convert(boxes[b], "cxcywh", "xyxy")
        gt_xyxy = box_convert(t["boxes"], "cxcywh", "xyxy")
        cost = (w_cls * (pos - neg) + w_l1 * torch.cdist(boxes[b], t["boxes"], p=1)
                - w_giou * generalized_box_iou(pred_xyxy, gt_xyxy))
        rows, cols = linear_sum_assignment(cost.detach().double().numpy())
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        target_cls[b, rows, 0] = 1.0
        l1 = l1 + (boxes[b, rows] - t["boxes"][cols]).abs().sum()
        giou = giou + (1 - torch.diag(generalized_box_iou(pred_xyxy[rows], gt_xyxy[cols]))).sum()
    ce = sigmoid_focal_loss(logits, target_cls, alpha=alpha, gamma=2.0, reduction="sum")
    return {"loss_ce_interm": w_cls * ce / num_boxes, "loss_bbox_interm": w_l1 * l1 / num_boxes,
            "loss_giou_interm": w_giou * giou / num_boxes}


@pytest.mark.parametrize("seed", [0, 1])
def test_interm_loss_matches_binary_label_reference(seed):
    """Every location matched against the gts with labels 0; rtol 1e-5 (float32 sums of the same
    terms in another order)."""
    g = torch.Generator().manual_seed(seed)
    batch, locations, classes = 2, 40, 4
    logits = torch.randn(batch, locations, classes, generator=g)
    boxes = torch.cat([torch.rand(batch, locations, 2, generator=g) * 0.8 + 0.1,
                       torch.rand(batch, locations, 2, generator=g) * 0.3 + 0.05], -1)
    targets = []
    for n in (3, 5):
        targets.append({"labels": torch.randint(1, classes, (n,), generator=g),  # never 0
                        "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                            torch.rand(n, 2, generator=g) * 0.3 + 0.1], -1)})
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25)

    def criterion(agnostic):
        return SetCriterion(classes, matcher, 2.0, 5.0, 2.0, 0.25, ["labels", "boxes"], True, 1.0,
                            False, "focal", interm_class_agnostic=agnostic)

    # The decoder outputs are irrelevant here: the interm terms are checked.
    outputs = {"pred_logits": logits[:, :5], "pred_boxes": boxes[:, :5],
               "interm_outputs": {"pred_logits": logits, "pred_boxes": boxes}}
    got = criterion(True)(outputs, targets)
    want = _reference_interm_losses(logits, boxes, targets)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value.float(), rtol=1e-5, atol=1e-6)
    # With the gt classes (per_class) the class term differs: the flag is what makes it binary.
    assert not torch.isclose(criterion(False)(outputs, targets)["loss_ce_interm"], got["loss_ce_interm"])
    assert got["loss_ce"].item() == criterion(False)(outputs, targets)["loss_ce"].item()


def test_model_supervises_every_location_and_decodes_the_class_zero_top_k():
    from test_model import TINY, random_batch

    torch.manual_seed(2)
    spec = load_spec(None, TINY + DEFORMABLE + AGNOSTIC)
    model = build_model(spec, num_classes=3).train()
    head, tr = model.query_head, model.query_head.transformer
    for p in head.cls_branches[-1].parameters():  # random encoder scores: no ties in the top-k
        nn.init.normal_(p, std=0.5)
    captured = []
    original = tr.select_queries
    tr.select_queries = lambda *args: captured.append((args[0], original(*args))) or captured[-1][1]
    images, masks, targets = random_batch()
    out = model(images, masks, targets)
    memory, (content, reference_unsig, topk) = captured[0]
    interm = out["interm_outputs"]
    assert interm["pred_logits"].shape == (2, memory.memory.shape[1], 3)  # S locations, all classes
    want = interm["pred_logits"][..., 0].topk(reference_unsig.shape[1], dim=1).indices
    boxes = torch.logit(interm["pred_boxes"].clamp(1e-6, 1 - 1e-6))  # inverse of the sigmoid
    picked = boxes.gather(1, want[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(reference_unsig, picked, rtol=1e-4, atol=1e-4)
    losses = build_criterion(spec, num_classes=3)(out, targets)
    assert build_criterion(spec, 3).interm_class_agnostic
    losses["loss_ce_interm"].backward()
    grad = head.cls_branches[-1].weight.grad
    assert grad is not None and grad[1:].abs().sum() > 0  # classes 1.. are pushed down everywhere


def test_spec_and_recipe():
    with pytest.raises(SpecError, match="encoder_proposal_classes"):
        load_spec(None, AGNOSTIC + ["model.two_stage_type='no'"])
    with pytest.raises(SpecError, match="per_class"):
        load_spec(None, ["model.encoder_proposal_classes=first_class"])
    from test_co_deformable_detr import RECIPE

    assert load_spec(RECIPE).model.encoder_proposal_classes == "class_agnostic"
    assert load_spec(None).model.encoder_proposal_classes == "per_class"  # Co-DINO


def test_tiny_class_agnostic_co_deformable_detr_trains():
    losses = train_losses(DEFORMABLE + AGNOSTIC + ["model.pe_temperatureH=10000",
                                                   "model.pe_temperatureW=10000"])
    assert all(math.isfinite(v) for v in losses)
    assert loss_fell(losses), losses


def test_onnx_parity_uses_the_class_zero_selection(tmp_path):
    """The exported graph ranks by class 0 too: eager's own top-k equals the graph's."""
    pytest.importorskip("onnxruntime")
    from export_fixtures import LABEL_MAP, random_model

    from codetr.export.onnx_export import export_onnx
    from codetr.export.parity import onnx_parity
    from codetr.spec import spec_to_dict
    from test_export_onnx import TOL, tiny_model_dict

    model, spec = random_model(tiny_model_dict(decoder_query_pos="proposal", use_dn=False,
                                               encoder_proposal_classes="class_agnostic"))
    path = tmp_path / "m.onnx"
    export_onnx(model, path, label_map=LABEL_MAP, spec_data=spec_to_dict(spec), weights="model",
                height=64, width=96)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    parity = onnx_parity(model, path, images, tolerance=TOL)
    assert parity.selection_ranks_differing == 0, parity
    assert parity.max_score_diff <= TOL and parity.max_box_diff <= TOL, parity
