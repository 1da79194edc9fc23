"""SetCriterion: hand-checked cases against torchvision's focal loss, IoU and GIoU, dn/pos layouts."""
import pytest
import torch
from torchvision import ops

import torch.nn.functional as F

from codetr.losses import HungarianMatcher, SetCriterion, quality_focal_loss, sigmoid_focal_loss

C = 4  # classes


def _criterion(**overrides) -> SetCriterion:
    args = dict(num_classes=C, matcher=HungarianMatcher(2.0, 5.0, 2.0, 0.25), cls_loss_coef=2.0,
                bbox_loss_coef=5.0, giou_loss_coef=2.0, focal_alpha=0.25,
                loss_types=["labels", "boxes"], aux_loss=True, interm_loss_coef=1.0,
                no_interm_box_loss=False)
    args.update(overrides)
    return SetCriterion(**args)


def _boxes(*shape) -> torch.Tensor:
    return torch.cat([torch.rand(*shape, 2) * 0.5 + 0.25, torch.rand(*shape, 2) * 0.3 + 0.05], -1)


def _targets(sizes) -> list:
    return [{"labels": torch.randint(0, C, (n,)), "boxes": _boxes(n)} for n in sizes]


def _group(b, q, requires_grad=False) -> dict:
    logits = torch.randn(b, q, C).requires_grad_(requires_grad)
    boxes = _boxes(b, q).requires_grad_(requires_grad)
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_focal_loss_matches_torchvision():
    logits = torch.randn(3, 7, C) * 3
    onehot = (torch.rand(3, 7, C) > 0.7).float()
    for alpha in (0.25, 0.6, -1.0):
        torch.testing.assert_close(sigmoid_focal_loss(logits, onehot, alpha, 2.0),
                                   ops.sigmoid_focal_loss(logits, onehot, alpha, 2.0))
    torch.testing.assert_close(sigmoid_focal_loss(logits, onehot, 0.25, 1.5),
                               ops.sigmoid_focal_loss(logits, onehot, 0.25, 1.5))


def _mmdet_style_qfl(logits, labels, scores, beta):
    """Quality focal loss written as mmdet's two branches: every entry is a negative
    (`BCE(x, 0) * p ** beta`), then each positive row's gt-class entry is overwritten with
    `BCE(x, score) * |score - p| ** beta`. labels: [N] (C = background), scores: [N]."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                              reduction="none") * prob.pow(beta)
    for row in range(len(labels)):
        c = int(labels[row])
        if c < logits.shape[1]:
            x, t = logits[row, c], scores[row]
            loss[row, c] = (F.binary_cross_entropy_with_logits(x, t)
                            * (t - prob[row, c]).abs().pow(beta))
    return loss


def test_quality_focal_loss_matches_the_two_branch_form():
    logits = torch.randn(40, C, dtype=torch.float64) * 3
    labels = torch.randint(0, C + 1, (40,))  # C = background
    scores = torch.rand(40, dtype=torch.float64)
    targets = torch.zeros_like(logits)
    positive = labels < C
    targets[positive.nonzero()[:, 0], labels[positive]] = scores[positive]
    for beta in (2.0, 1.5):
        torch.testing.assert_close(quality_focal_loss(logits, targets, beta),
                                   _mmdet_style_qfl(logits, labels, scores, beta))
    half = quality_focal_loss(logits.bfloat16(), targets)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_quality_focal_criterion_targets_the_detached_iou():
    targets = _targets([3, 2])
    outputs = _group(2, 6, requires_grad=True)
    criterion = _criterion(cls_loss_type="quality_focal")
    losses = criterion(outputs, targets)
    indices = criterion.matcher(outputs["pred_logits"], outputs["pred_boxes"], targets)
    soft = torch.zeros(2, 6, C)
    for i, ((src, tgt), t) in enumerate(zip(indices, targets)):
        pred = ops.box_convert(outputs["pred_boxes"][i, src].detach(), "cxcywh", "xyxy")
        gt = ops.box_convert(t["boxes"][tgt], "cxcywh", "xyxy")
        soft[i, src, t["labels"][tgt]] = ops.box_iou(pred, gt).diagonal()
    assert soft.sum() > 0  # some matched pairs overlap, so the targets are not one-hot
    expected = quality_focal_loss(outputs["pred_logits"].detach(), soft).sum() / 5
    torch.testing.assert_close(losses["loss_ce"].detach(), 2.0 * expected)
    # the IoU target is detached: the class loss alone moves no box
    labels_only = _criterion(cls_loss_type="quality_focal", loss_types=["labels"])
    labels_only(outputs, targets)["loss_ce"].backward()
    assert outputs["pred_boxes"].grad is None and outputs["pred_logits"].grad.abs().sum() > 0


def _perfect_case(sizes, q=6):
    """Outputs whose query perm[i][j] predicts gt j exactly; the other queries are far away."""
    targets = _targets(sizes)
    logits = torch.randn(len(sizes), q, C)
    boxes = torch.cat([torch.rand(len(sizes), q, 2) * 0.05 + 0.9,
                       torch.full((len(sizes), q, 2), 0.02)], -1)  # tiny boxes in a corner
    perms = []
    for i, t in enumerate(targets):
        perm = torch.randperm(q)[: len(t["labels"])]
        boxes[i, perm] = t["boxes"]
        logits[i, perm, t["labels"]] = 6.0
        perms.append(perm)
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, perms


def test_perfect_boxes_give_zero_box_loss_and_class_loss_matches_torchvision():
    sizes = [3, 1, 0, 2]
    outputs, targets, perms = _perfect_case(sizes)
    losses = _criterion()(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].item() < 1e-6 and losses["loss_giou"].item() < 1e-6
    onehot = torch.zeros_like(outputs["pred_logits"])
    for i, (t, perm) in enumerate(zip(targets, perms)):
        onehot[i, perm, t["labels"]] = 1
    expected = ops.sigmoid_focal_loss(outputs["pred_logits"], onehot, 0.25, 2.0,
                                      reduction="sum") / sum(sizes)
    torch.testing.assert_close(losses["loss_ce"], 2.0 * expected)


def test_box_losses_match_hand_computation():
    outputs, targets, perms = _perfect_case([2, 3])
    outputs["pred_boxes"] = outputs["pred_boxes"].clone()
    shift = torch.rand(2, 6, 4) * 0.02
    outputs["pred_boxes"] += shift  # small: the matching stays perm
    l1 = giou = 0.0
    for i, (t, perm) in enumerate(zip(targets, perms)):
        pred = outputs["pred_boxes"][i, perm]
        l1 += (pred - t["boxes"]).abs().sum()
        giou += ops.generalized_box_iou_loss(ops.box_convert(pred, "cxcywh", "xyxy"),
                                             ops.box_convert(t["boxes"], "cxcywh", "xyxy"),
                                             reduction="sum", eps=0.0)  # exact, as ours
    losses = _criterion()(outputs, targets)
    torch.testing.assert_close(losses["loss_bbox"], 5.0 * l1 / 5)
    torch.testing.assert_close(losses["loss_giou"], 2.0 * giou / 5)


def test_gradients_flow_to_all_predictions():
    targets = _targets([2, 3])
    outputs = _group(2, 7, requires_grad=True)
    outputs["aux_outputs"] = [_group(2, 7, requires_grad=True)]
    losses = _criterion()(outputs, targets)
    sum(losses.values()).backward()
    for group in (outputs, outputs["aux_outputs"][0]):
        assert group["pred_logits"].grad.abs().sum() > 0
        assert group["pred_boxes"].grad.abs().sum() > 0
        assert torch.isfinite(group["pred_boxes"].grad).all()


def _dn_outputs(targets, groups, max_gt, layers=2):
    """Denoising predictions that are perfect on the positive slots of the DESIGN.md layout."""
    b = len(targets)
    pad = groups * 2 * max_gt
    out = []
    for _ in range(layers):
        logits = torch.full((b, pad, C), -6.0) + torch.rand(b, pad, C)
        boxes = _boxes(b, pad)
        for i, t in enumerate(targets):
            for g in range(groups):
                for j in range(len(t["labels"])):
                    boxes[i, g * 2 * max_gt + j] = t["boxes"][j]
                    logits[i, g * 2 * max_gt + j, t["labels"][j]] = 6.0
        out.append({"pred_logits": logits, "pred_boxes": boxes})
    dn = dict(out[-1])
    dn["aux_outputs"] = out[:-1]
    dn["dn_meta"] = {"num_groups": groups, "max_gt": max_gt, "pad_size": groups * 2 * max_gt}
    return dn


def test_denoising_follows_the_dn_meta_layout():
    targets = _targets([3, 1])
    dn = _dn_outputs(targets, groups=2, max_gt=3)
    outputs = {**_group(2, 5), "dn_outputs": dn}
    losses = _criterion()(outputs, targets)
    for suffix in ("_dn", "_dn_0"):
        assert losses["loss_bbox" + suffix].item() < 1e-6
        assert losses["loss_giou" + suffix].item() < 1e-6
        assert losses["loss_ce" + suffix].item() < 0.01
    # Swap positive and negative halves of every group: the positives are now wrong.
    swapped = torch.cat([torch.arange(3, 6), torch.arange(0, 3), torch.arange(9, 12),
                         torch.arange(6, 9)])
    for group in [dn, *dn["aux_outputs"]]:
        group["pred_logits"] = group["pred_logits"][:, swapped]
        group["pred_boxes"] = group["pred_boxes"][:, swapped]
    worse = _criterion()(outputs, targets)
    for name in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0"):
        assert worse[name] > losses[name] + 0.1


def test_denoising_normalises_by_gt_times_groups():
    targets = _targets([2, 2])
    dn = _dn_outputs(targets, groups=3, max_gt=2, layers=1)
    dn["pred_boxes"] = dn["pred_boxes"] + 0.01  # every box off by 0.01 per coordinate
    losses = _criterion(aux_loss=False)({**_group(2, 4), "dn_outputs": dn}, targets)
    # 3 groups x 4 gt positives, 4 coordinates each off by 0.01, normalised by 4 gt x 3 groups.
    torch.testing.assert_close(losses["loss_bbox_dn"], torch.tensor(5.0 * 0.04), rtol=1e-4,
                               atol=1e-6)
    assert "loss_bbox_dn_0" not in losses


def _pos_outputs(b, n, layers):
    labels = torch.randint(0, C, (b, n))
    labels[torch.rand(b, n) < 0.4] = C  # background padding
    labels[0, 0] = 1
    return {"layers": [_group(b, n, requires_grad=True) for _ in range(layers)],
            "targets": {"labels": labels, "boxes": _boxes(b, n)}}


def test_positive_queries_direct_supervision():
    pos = _pos_outputs(2, 9, layers=2)
    positive = pos["targets"]["labels"] != C
    num_pos = positive.sum()
    # Make layer 1 perfect on the positive slots.
    perfect = pos["layers"][1]
    with torch.no_grad():
        perfect["pred_boxes"][positive] = pos["targets"]["boxes"][positive]
    outputs = {**_group(2, 5), "pos_outputs": [pos]}
    losses = _criterion()(outputs, _targets([1, 2]))
    assert losses["loss_bbox_pos0_1"].item() < 1e-6
    layer0 = pos["layers"][0]
    l1 = (layer0["pred_boxes"][positive] - pos["targets"]["boxes"][positive]).abs().sum()
    torch.testing.assert_close(losses["loss_bbox_pos0_0"], 5.0 * l1 / num_pos)
    onehot = torch.nn.functional.one_hot(pos["targets"]["labels"], C + 1)[..., :C].float()
    focal = ops.sigmoid_focal_loss(layer0["pred_logits"], onehot, 0.25, 2.0, reduction="sum")
    torch.testing.assert_close(losses["loss_ce_pos0_0"], 2.0 * focal / num_pos)
    sum(losses.values()).backward()
    assert layer0["pred_boxes"].grad.abs().sum() > 0


def test_all_names_and_interm_options():
    targets = _targets([2, 1])
    outputs = _group(2, 6)
    outputs["aux_outputs"] = [_group(2, 6), _group(2, 6)]
    outputs["interm_outputs"] = _group(2, 6)
    outputs["dn_outputs"] = _dn_outputs(targets, groups=2, max_gt=2, layers=3)
    outputs["pos_outputs"] = [_pos_outputs(2, 9, 3), _pos_outputs(2, 9, 3)]
    outputs["co_losses"] = {"loss_cls_co0": torch.tensor(0.5)}
    losses = _criterion()(outputs, targets)
    suffixes = (["", "_0", "_1", "_interm", "_dn", "_dn_0", "_dn_1"]
                + [f"_pos{h}_{l}" for h in range(2) for l in range(3)])
    expected = {f"{name}{s}" for s in suffixes for name in ("loss_ce", "loss_bbox", "loss_giou")}
    assert set(losses) == expected | {"loss_cls_co0"}
    assert all(torch.isfinite(v) for v in losses.values())

    half = _criterion(interm_loss_coef=0.5, no_interm_box_loss=True)(outputs, targets)
    torch.testing.assert_close(half["loss_ce_interm"], 0.5 * losses["loss_ce_interm"])
    assert "loss_bbox_interm" not in half and "loss_giou_interm" not in half

    only_last = _criterion(aux_loss=False, loss_types=["labels"])(outputs, targets)
    assert set(only_last) == {"loss_ce", "loss_ce_interm", "loss_ce_dn", "loss_ce_pos0_2",
                              "loss_ce_pos1_2", "loss_cls_co0"}

    outputs["co_losses"] = {"loss_ce": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="collides"):
        _criterion()(outputs, targets)


def test_zero_gt_in_whole_batch_is_finite():
    targets = _targets([0, 0])
    outputs = _group(2, 6, requires_grad=True)
    outputs["aux_outputs"] = [_group(2, 6)]
    outputs["interm_outputs"] = _group(2, 6)
    outputs["dn_outputs"] = _dn_outputs(targets, groups=1, max_gt=0, layers=2)
    pos = _pos_outputs(2, 9, 2)
    pos["targets"]["labels"][:] = C
    outputs["pos_outputs"] = [pos]
    losses = _criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_ce"] > 0 and losses["loss_ce_pos0_1"] > 0
    assert losses["loss_bbox"] == 0 and losses["loss_giou_pos0_0"] == 0
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_bf16_inputs_give_float32_losses():
    targets = _targets([2, 3])
    outputs = {k: v.bfloat16() for k, v in _group(2, 6).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion()(outputs, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_rejects_wrong_class_count_and_loss_type():
    with pytest.raises(ValueError, match="loss_types"):
        _criterion(loss_types=["labels", "masks"])
    with pytest.raises(ValueError, match="quality_focal"):
        _criterion(cls_loss_type="varifocal")
    with pytest.raises(ValueError, match="classes"):
        _criterion()({"pred_logits": torch.randn(1, 3, C + 1), "pred_boxes": _boxes(1, 3)},
                     _targets([1]))
