"""ATSS assigner, box coder, CoATSSHead and its losses against loop / torchvision references."""
import math
import statistics

import pytest
import torch
from torchvision import ops

from codetr.losses.atss_assigner import anchors_inside_image, atss_assign
from codetr.losses.atss_loss import (
    atss_losses,
    delta_xywh_decode,
    delta_xywh_encode,
)
from codetr.model.atss_head import CoATSSHead, grid_anchors

STRIDES = [8, 16, 32, 64]
PADDED = 128  # padded image side; feature maps are PADDED / stride


def _grid(dtype=torch.float32):
    sizes = [(PADDED // s, PADDED // s) for s in STRIDES]
    anchors = grid_anchors(sizes, STRIDES, octave_base_scale=8)
    return torch.cat(anchors).to(dtype), [a.shape[0] for a in anchors]


def _random_gts(n: int, h: float, w: float, gen: torch.Generator, dtype=torch.float64,
                min_side: float = 0.03):
    """`[n, 4]` xyxy pixel boxes inside an (h, w) image, sides from `min_side` to 0.73 of it."""
    size = torch.rand(n, 2, generator=gen, dtype=dtype) * (0.73 - min_side) + min_side
    size = size * torch.tensor([w, h], dtype=dtype)
    top_left = torch.rand(n, 2, generator=gen, dtype=dtype) * (torch.tensor([w, h]) - size)
    return torch.cat([top_left, top_left + size], dim=1)


def _loop_assign(anchors, counts, gts, labels, topk, valid_hw):
    """Straightforward per-gt, per-anchor ATSS (mmdet semantics) in Python floats."""
    iou = ops.box_iou(anchors, gts).tolist()
    centres = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in anchors.tolist()]
    valid = [cx < valid_hw[1] and cy < valid_hw[0] for cx, cy in centres]
    best = [(-math.inf, -1)] * len(centres)
    for g, (x1, y1, x2, y2) in enumerate(gts.tolist()):
        gx, gy = (x1 + x2) / 2, (y1 + y2) / 2
        candidates, start = [], 0
        for count in counts:
            level = [i for i in range(start, start + count) if valid[i]]
            level.sort(key=lambda i: math.hypot(centres[i][0] - gx, centres[i][1] - gy))
            candidates += level[:topk]
            start += count
        values = [iou[i][g] for i in candidates]
        threshold = statistics.mean(values) + statistics.stdev(values)
        for i in candidates:
            cx, cy = centres[i]
            inside = min(cx - x1, cy - y1, x2 - cx, y2 - cy) > 0.01
            if iou[i][g] >= threshold and inside and iou[i][g] > best[i][0]:
                best[i] = (iou[i][g], g)
    index = torch.tensor([g for _, g in best])
    return index, torch.where(index >= 0, labels[index.clamp(min=0)], -1)


@pytest.mark.parametrize("layout", ["grid", "random"])
def test_assigner_matches_loop_reference_on_random_boxes(layout):
    # Grid anchors are the head's; random anchors of random sizes make the IoU threshold bind
    # (on the grid the centre-inside rule alone often decides).
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    total_pos = 0
    for _ in range(6):
        if layout == "grid":
            anchors, counts = _grid(torch.float64)
        else:
            counts = torch.randint(3, 60, (3,), generator=gen).tolist()
            anchors = torch.cat([_random_gts(n, PADDED, PADDED, gen) for n in counts])
        h, w = (float(v) for v in torch.randint(70, PADDED + 1, (2,), generator=gen))
        gts = _random_gts(int(torch.randint(1, 7, (1,), generator=gen)), h, w, gen)
        labels = torch.randint(0, 5, (gts.shape[0],), generator=gen)
        index, assigned_labels = atss_assign(anchors, counts, gts, labels, topk=9,
                                             valid_hw=(h, w))
        ref_index, ref_labels = _loop_assign(anchors, counts, gts, labels, 9, (h, w))
        assert torch.equal(index, ref_index)
        assert torch.equal(assigned_labels, ref_labels)
        total_pos += int((index >= 0).sum())
    assert total_pos > 0


def test_assigner_hand_cases():
    anchors, counts = _grid()
    labels = torch.tensor([3])
    # A gt identical to an anchor (stride 16, centred on (48, 64)): that anchor is positive.
    target = torch.tensor([[48 - 64, 64 - 64, 48 + 64, 64 + 64]], dtype=torch.float32)
    same = (anchors == target).all(dim=1).nonzero().item()
    index, assigned = atss_assign(anchors, counts, target, labels)
    assert index[same] == 0 and assigned[same] == 3
    assert set(index.tolist()) == {-1, 0} and torch.equal(assigned >= 0, index >= 0)

    # No gt: everything is background.
    index, assigned = atss_assign(anchors, counts, torch.zeros(0, 4), torch.zeros(0).long())
    assert (index == -1).all() and (assigned == -1).all()

    # A gt straddling the padding border: anchors centred in the padding never become positive.
    gt = torch.tensor([[40.0, 8.0, 120.0, 60.0]])
    free, _ = atss_assign(anchors, counts, gt, labels)
    padded, _ = atss_assign(anchors, counts, gt, labels, valid_hw=(100, 80))
    outside = ~anchors_inside_image(anchors, (100, 80))
    assert (free[outside] >= 0).any()
    assert (padded[outside] == -1).all() and (padded >= 0).any()

    # Two gts claiming the same anchor: the one it overlaps most wins.
    gts = torch.tensor([[0.0, 0.0, 64.0, 64.0], [8.0, 8.0, 56.0, 56.0]])
    index, assigned = atss_assign(anchors, counts, gts, torch.tensor([1, 2]))
    both = ops.box_iou(anchors, gts)
    shared = (index >= 0) & (both > 0).all(dim=1)
    assert shared.any()
    assert torch.equal(index[shared], both[shared].argmax(dim=1))


def _tiny_head_and_batch(num_gts=(3, 2), requires_grad=True):
    head = CoATSSHead(num_classes=5, in_channels=16, num_levels=len(STRIDES), stacked_convs=1)
    feats = [torch.randn(2, 16, PADDED // s, PADDED // s, requires_grad=requires_grad)
             for s in STRIDES]
    sizes = [(128, 100), (96, 128)]
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    targets = []
    for n, (h, w) in zip(num_gts, sizes):
        # sides >= 0.15 of the image: smaller ones left an image without positives (4 in 2000)
        gts = _random_gts(n, h, w, gen, torch.float32, min_side=0.15) / torch.tensor([w, h, w, h])
        targets.append({"boxes": ops.box_convert(gts, "xyxy", "cxcywh"),
                        "labels": torch.randint(0, 5, (n,), generator=gen),
                        "size": torch.tensor([h, w])})
    return head, feats, targets


def test_head_output_shapes_and_init():
    head, feats, _ = _tiny_head_and_batch()
    cls, deltas, ctr = head(feats)
    for c, d, n, f in zip(cls, deltas, ctr, feats):
        assert c.shape == (2, 5, *f.shape[-2:])
        assert d.shape == (2, 4, *f.shape[-2:]) and d.dtype == torch.float32
        assert n.shape == (2, 1, *f.shape[-2:])
    # Focal prior: the initial foreground probability is about 0.01 everywhere.
    assert abs(torch.cat([c.flatten() for c in cls]).sigmoid().mean().item() - 0.01) < 0.005
    anchors = head.anchors(feats, STRIDES)
    assert [a.shape[0] for a in anchors] == [f.shape[-2] * f.shape[-1] for f in feats]
    sides = torch.cat([a[:, 2:] - a[:, :2] for a in anchors])
    assert torch.equal(sides[:, 0], sides[:, 1])
    with pytest.raises(ValueError):
        head(feats[:-1])


def test_losses_match_reference_and_reach_the_features():
    head, feats, targets = _tiny_head_and_batch()
    losses, positives = head.loss_and_positives(feats, STRIDES, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert head.scales[0].scale.grad is not None

    # Recompute the three terms with torchvision's focal / GIoU losses and BCE.
    with torch.no_grad():
        cls, deltas, ctr = head(feats)
    anchors = head.anchors(feats, STRIDES)
    flat_anchors, counts = torch.cat(anchors), [a.shape[0] for a in anchors]
    ref_cls, ref_giou, ref_ctr, ctr_sum, num_pos = 0.0, 0.0, 0.0, 0.0, 0
    for b, target in enumerate(targets):
        h, w = target["size"].tolist()
        gts = ops.box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        # Every anchor of the padded batch counts, padding included (mmdet: pad_shape flags).
        index, labels = atss_assign(flat_anchors, counts, gts, target["labels"])
        valid = torch.ones(flat_anchors.shape[0], dtype=torch.bool)
        logits = torch.cat([c[b].flatten(1).T for c in cls])
        onehot = torch.zeros_like(logits)
        onehot[index >= 0, labels[index >= 0]] = 1
        ref_cls += ops.sigmoid_focal_loss(logits[valid], onehot[valid], reduction="sum")
        pos = index >= 0
        pos_gts = gts[index[pos]]
        # FCOS centerness, written out: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
        # of the anchor centre's distances to the gt's sides.
        cx = (flat_anchors[pos, 0] + flat_anchors[pos, 2]) / 2
        cy = (flat_anchors[pos, 1] + flat_anchors[pos, 3]) / 2
        left, right = cx - pos_gts[:, 0], pos_gts[:, 2] - cx
        top, bottom = cy - pos_gts[:, 1], pos_gts[:, 3] - cy
        centre_t = torch.sqrt(torch.minimum(left, right) / torch.maximum(left, right)
                              * torch.minimum(top, bottom) / torch.maximum(top, bottom))
        boxes = delta_xywh_decode(flat_anchors[pos], torch.cat([d[b].flatten(1).T
                                                                for d in deltas])[pos])
        ref_giou += (ops.generalized_box_iou_loss(boxes, pos_gts) * centre_t).sum()
        ref_ctr += torch.nn.functional.binary_cross_entropy_with_logits(
            torch.cat([c[b].flatten() for c in ctr])[pos], centre_t, reduction="sum")
        ctr_sum += centre_t.sum()
        num_pos += int(pos.sum())
        torch.testing.assert_close(positives[b].anchors, flat_anchors[pos])
        torch.testing.assert_close(positives[b].gt_boxes, pos_gts)
        assert torch.equal(positives[b].labels, labels[pos])
        assert positives[b].neg_anchors.shape[0] == int((valid & ~pos).sum())
    assert num_pos > 0
    torch.testing.assert_close(losses["loss_cls"].detach(), ref_cls / num_pos)
    torch.testing.assert_close(losses["loss_bbox"].detach(), ref_giou / max(ctr_sum, 1.0))
    torch.testing.assert_close(losses["loss_centerness"].detach(), ref_ctr / num_pos)


def test_zero_gt_batch_gives_finite_negative_only_losses():
    head, feats, targets = _tiny_head_and_batch(num_gts=(0, 0))
    losses, positives = head.loss_and_positives(feats, STRIDES, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"] > 0
    assert losses["loss_bbox"] == 0 and losses["loss_centerness"] == 0
    sum(losses.values()).backward()
    assert head.atss_reg.weight.grad is not None
    assert all(p.anchors.shape == (0, 4) and p.labels.shape == (0,) for p in positives)


def test_perfect_box_prediction_gives_near_zero_bbox_loss():
    _, feats, targets = _tiny_head_and_batch(num_gts=(1, 1), requires_grad=False)
    anchors = grid_anchors([f.shape[-2:] for f in feats], STRIDES, octave_base_scale=8)
    cls = [torch.randn(2, 5, *f.shape[-2:]) for f in feats]
    ctr = [torch.randn(2, 1, *f.shape[-2:]) for f in feats]
    deltas = []
    for a, f in zip(anchors, feats):
        per_image = []
        for target in targets:
            h, w = target["size"].tolist()
            gt = ops.box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
            # Every anchor regresses exactly onto the image's only gt.
            codes = delta_xywh_encode(a, gt.expand(a.shape[0], 4))
            per_image.append(codes.T.reshape(4, *f.shape[-2:]))
        deltas.append(torch.stack(per_image))
    losses, positives = atss_losses(cls, deltas, ctr, anchors, targets, num_classes=5)
    assert sum(p.anchors.shape[0] for p in positives) > 0
    assert losses["loss_bbox"] < 1e-4
    noisy = [d + torch.randn_like(d) for d in deltas]
    assert atss_losses(cls, noisy, ctr, anchors, targets, num_classes=5)[0]["loss_bbox"] > 1e-2


def test_positive_anchors_lie_on_positive_locations():
    head, feats, targets = _tiny_head_and_batch(requires_grad=False)
    _, positives = head.loss_and_positives(feats, STRIDES, targets)
    grid = torch.cat(head.anchors(feats, STRIDES))
    for sample, target in zip(positives, targets):
        h, w = target["size"].tolist()
        assert sample.anchors.shape[0] > 0
        # Each positive is a grid anchor, centred on its level's stride grid inside the image...
        assert ((sample.anchors[:, None] == grid[None]).all(-1).sum(1) == 1).all()
        side = sample.anchors[:, 2] - sample.anchors[:, 0]
        centre = (sample.anchors[:, :2] + sample.anchors[:, 2:]) / 2
        stride = side / 8
        assert (torch.remainder(centre, stride[:, None]) == 0).all()
        assert (centre[:, 0] < w).all() and (centre[:, 1] < h).all()
        # ... whose centre is strictly inside its assigned gt.
        assert (centre > sample.gt_boxes[:, :2]).all() and (centre < sample.gt_boxes[:, 2:]).all()


def test_anchors_over_the_batch_padding_are_negatives_and_candidates():
    """Parity fix 1: without `pad_size` (the reference's metas, whose `pad_shape` is the batch
    shape) every anchor of the padded batch is valid, so the anchors over an image's padding are
    focal-loss negatives and pads for the positive queries (`test_anchor_valid_flags.py`: with a
    `pad_size`, those beyond it are not)."""
    head, feats, targets = _tiny_head_and_batch(requires_grad=False)
    with torch.no_grad():
        losses, positives = head.loss_and_positives(feats, STRIDES, targets, per_level=True)
        cls = head(feats)[0]
    anchors = head.anchors(feats, STRIDES)
    flat = torch.cat(anchors)
    for sample, target in zip(positives, targets):
        padding = ~anchors_inside_image(flat, target["size"].tolist())
        assert padding.any()  # both images are smaller than the 128 x 128 batch
        assert sample.anchors.shape[0] + sample.neg_anchors.shape[0] == flat.shape[0]
    # The class loss of every level counts all H_l x W_l x B anchors: with all-background
    # targets, each level is the focal loss of all its logits over the same normaliser (1).
    empty = [dict(t, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)) for t in targets]
    with torch.no_grad():
        background, _ = head.loss_and_positives(feats, STRIDES, empty, per_level=True)
    for level, logits in enumerate(cls):
        expected = ops.sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
        torch.testing.assert_close(background["loss_cls"][level], expected)
    torch.testing.assert_close(losses["loss_cls"].sum(),
                               head.loss_and_positives(feats, STRIDES, targets)[0]["loss_cls"].detach())
