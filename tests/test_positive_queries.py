"""Customized positive queries: sizes, padding, subsampling, normalisation, link to the head."""
import torch
from torchvision import ops

from codetr.losses.atss_loss import PositiveSamples
from codetr.model.atss_head import CoATSSHead
from codetr.model.positive_queries import build_positive_queries

NUM_CLASSES = 7


def _samples(num_pos: int, h: float, w: float, num_neg: int = 40) -> PositiveSamples:
    """Random positives (anchor centre inside the image, gt around it) plus negatives."""
    def boxes(n):
        centre = torch.rand(n, 2) * torch.tensor([w, h])
        size = torch.rand(n, 2) * 60 + 4
        return torch.cat([centre - size / 2, centre + size / 2], dim=1)
    return PositiveSamples(anchors=boxes(num_pos),
                           labels=torch.randint(0, NUM_CLASSES, (num_pos,)),
                           gt_boxes=boxes(num_pos), neg_anchors=boxes(num_neg))


def _normalised(boxes_xyxy, h, w):
    return ops.box_convert(boxes_xyxy / torch.tensor([w, h, w, h]), "xyxy", "cxcywh")


def _nearest(boxes, pool):
    """For each row of `boxes` `[K, 4]`: (max-abs distance, index) of the closest row of `pool`."""
    return (boxes[:, None] - pool[None]).abs().amax(dim=-1).min(dim=1)


def test_padding_sizes_and_background_labels():
    sizes = torch.tensor([[100, 120], [80, 90], [64, 64]])
    samples = [_samples(n, h, w) for n, (h, w) in zip((0, 5, 20), sizes.tolist())]
    boxes, targets, _ = build_positive_queries(samples, sizes, NUM_CLASSES)
    assert boxes.shape == (3, 20, 4)
    assert targets["labels"].shape == (3, 20) and targets["labels"].dtype == torch.int64
    assert targets["boxes"].shape == (3, 20, 4)
    for i, sample in enumerate(samples):
        n = sample.anchors.shape[0]
        assert torch.equal(targets["labels"][i, :n], sample.labels)
        assert (targets["labels"][i, n:] == NUM_CLASSES).all()
        # Pads are drawn from the image's own negative anchors.
        h, w = sizes[i].tolist()
        negs = _normalised(sample.neg_anchors, h, w)
        assert (_nearest(boxes[i, n:], negs)[0] < 1e-6).all()
    # Normalised, not clamped (mmdet): centres inside the image, sizes as drawn.
    assert (boxes[..., :2] >= 0).all() and (boxes[..., :2] <= 1).all()


def test_minimum_and_maximum_number_of_queries():
    sizes = torch.tensor([[50, 50], [60, 40]])
    boxes, targets, _ = build_positive_queries([_samples(0, 50, 50), _samples(0, 60, 40)],
                                            sizes, NUM_CLASSES)
    assert boxes.shape == (2, 9, 4) and (targets["labels"] == NUM_CLASSES).all()

    many = [_samples(50, 50, 50), _samples(3, 60, 40)]
    boxes, targets, _ = build_positive_queries(many, sizes, NUM_CLASSES, max_queries=16)
    assert boxes.shape == (2, 16, 4)
    # The subsample keeps distinct positives with their own gts and labels.
    ref_anchors = _normalised(many[0].anchors, 50, 50)
    ref_gts = _normalised(many[0].gt_boxes, 50, 50)
    distance, picked = _nearest(boxes[0], ref_anchors)
    assert (distance < 1e-6).all() and picked.unique().numel() == 16
    torch.testing.assert_close(targets["boxes"][0], ref_gts[picked])
    assert torch.equal(targets["labels"][0], many[0].labels[picked])
    assert (targets["labels"][1, 3:] == NUM_CLASSES).all()


def test_normalisation_and_generator_reproducibility():
    h, w = 90, 130
    sample = _samples(12, h, w)
    sizes = torch.tensor([[h, w]])
    first = build_positive_queries([sample], sizes, NUM_CLASSES,
                                   generator=torch.Generator().manual_seed(3))
    again = build_positive_queries([sample], sizes, NUM_CLASSES,
                                   generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first[0], again[0])
    torch.testing.assert_close(first[1]["boxes"], again[1]["boxes"])
    boxes, targets, _ = first
    torch.testing.assert_close(boxes[0], _normalised(sample.anchors, h, w))
    torch.testing.assert_close(targets["boxes"][0], _normalised(sample.gt_boxes, h, w))


def test_queries_from_the_head_sit_on_positive_locations():
    strides = [8, 16, 32]
    head = CoATSSHead(num_classes=NUM_CLASSES, in_channels=8, num_levels=3, stacked_convs=1)
    feats = [torch.randn(2, 8, 96 // s, 96 // s) for s in strides]
    sizes = torch.tensor([[96, 80], [72, 96]])
    targets = []
    for h, w in sizes.tolist():
        centre = torch.rand(3, 2) * 0.6 + 0.2
        wh = torch.rand(3, 2) * 0.3 + 0.1
        targets.append({"boxes": torch.cat([centre, wh], dim=1),
                        "labels": torch.randint(0, NUM_CLASSES, (3,)),
                        "size": torch.tensor([h, w])})
    _, positives = head.loss_and_positives(feats, strides, targets)
    boxes, query_targets, _ = build_positive_queries(positives, sizes, NUM_CLASSES)
    for i, (h, w) in enumerate(sizes.tolist()):
        real = query_targets["labels"][i] < NUM_CLASSES
        assert real.sum() == positives[i].anchors.shape[0] > 0
        centre_px = boxes[i, real, :2] * torch.tensor([w, h])
        side_px = boxes[i, real, 2:] * torch.tensor([w, h])
        # Centres on a stride grid inside the image, strictly inside the assigned gt.
        on_grid = [((centre_px / s) - (centre_px / s).round()).abs().amax(dim=1) < 1e-4
                   for s in strides]
        assert torch.stack(on_grid).any(dim=0).all()
        gt = ops.box_convert(query_targets["boxes"][i, real], "cxcywh", "xyxy")
        centre = boxes[i, real, :2]
        assert (centre > gt[:, :2]).all() and (centre < gt[:, 2:]).all()
        assert (side_px > 0).all()


def test_boxes_larger_than_the_image_are_not_clamped():
    """Parity fix 2: mmdet's get_aux_targets divides by (w, h, w, h) and stops there; an ATSS
    anchor of 8 strides is wider than a small image (w > 1). We used to clamp it to 1."""
    anchor = torch.tensor([[-64.0, -64.0, 64.0, 64.0]])  # 128 px, centred on (0, 0)
    sample = PositiveSamples(anchors=anchor, labels=torch.tensor([2]),
                             gt_boxes=torch.tensor([[0.0, 0.0, 40.0, 30.0]]), neg_anchors=anchor + 8)
    boxes, targets, _ = build_positive_queries([sample], torch.tensor([[96, 80]]), NUM_CLASSES)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.0, 0.0, 128 / 80, 128 / 96]))
    torch.testing.assert_close(targets["boxes"][0, 0], torch.tensor([20 / 80, 15 / 96, 40 / 80, 30 / 96]))


def test_pads_draw_the_generator_only_when_needed():
    """Parity fix 3: an image with exactly N positives draws nothing (mmdet calls randperm only
    to subsample or to pad), so the next image's pads are randperm(#neg)[:N - P] of the seed."""
    full, short = _samples(12, 80, 80, num_neg=40), _samples(5, 80, 80, num_neg=40)
    boxes, targets, _ = build_positive_queries([full, short], torch.tensor([[80, 80], [80, 80]]), NUM_CLASSES,
                                            generator=torch.Generator().manual_seed(301))
    expected = torch.randperm(40, generator=torch.Generator().manual_seed(301))[:7]
    torch.testing.assert_close(boxes[1, 5:], _normalised(short.neg_anchors[expected], 80, 80))
    assert (targets["labels"][1, 5:] == NUM_CLASSES).all() and (targets["labels"][0] < NUM_CLASSES).all()
