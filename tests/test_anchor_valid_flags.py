"""mmdet's valid flags in the co-heads' losses: anchors beyond an image's own padded extent
(`pad_size`, mmdet's per-image `pad_shape` from `DetDataPreprocessor._get_pad_shape`) lie over
another image's padding; they are never ATSS candidates, carry no focal weight, and are neither
assigned nor sampled by the RPN. Checked against torchvision's focal loss and BCE over the valid
anchors only."""
import pytest
import torch
import torch.nn.functional as F
from torchvision import ops

from codetr.data.collate import collate_fn, pad_size
from codetr.losses.atss_assigner import anchors_inside_image
from codetr.losses.max_iou_assigner import max_iou_assign
from codetr.losses.rpn_loss import rpn_losses
from test_atss import STRIDES, _tiny_head_and_batch


def test_pad_size_is_the_own_size_rounded_up_also_under_fixed_zero_padding():
    samples = [(torch.rand(3, 50, 70), {"size": torch.tensor([50, 70])}),
               (torch.rand(3, 64, 33), {"size": torch.tensor([64, 33])})]
    batch = collate_fn(samples, pad_size_divisor=32)
    assert batch.images.shape[-2:] == (64, 96)
    assert [t["pad_size"] for t in batch.targets] == [(64, 96), (64, 64)]
    fixed = collate_fn(samples, pad_size_divisor=32, fixed_size=(128, 128))
    assert fixed.images.shape[-2:] == (128, 128)  # zeros + mask beyond the image: not image
    assert [t["pad_size"] for t in fixed.targets] == [(64, 96), (64, 64)]
    assert pad_size(torch.tensor([50, 70])) == (50, 70)


@pytest.mark.parametrize("draw", [0, 1])  # two fresh draws (conftest seeds each test afresh)
def test_atss_ignores_anchors_beyond_the_pad_size(draw):
    head, feats, targets = _tiny_head_and_batch(requires_grad=False)
    # Logits away from the focal prior: at p = 0.01 an anchor's negative focal term is ~4e-6, so
    # the anchors beyond the pad size would move the loss by about the tolerance of allclose.
    torch.nn.init.normal_(head.atss_cls.bias)
    padded = [dict(t, pad_size=tuple(t["size"].tolist())) for t in targets]  # divisor 1: pad = own size
    anchors = torch.cat(head.anchors(feats, STRIDES))
    with torch.no_grad():
        losses, positives = head.loss_and_positives(feats, STRIDES, padded)
        all_valid, _ = head.loss_and_positives(feats, STRIDES, targets)
        cls = torch.cat([c.permute(0, 2, 3, 1).reshape(2, -1, 5) for c in head(feats)[0]], 1)
    num_pos = sum(p.anchors.shape[0] for p in positives)
    expected = 0.0
    for b, (sample, target) in enumerate(zip(positives, padded)):
        valid = anchors_inside_image(anchors, target["size"].tolist())
        assert not valid.all()  # both images are smaller than the batch
        assert anchors_inside_image(sample.anchors, target["size"].tolist()).all()
        onehot = torch.zeros(anchors.shape[0], 5)
        rows = (sample.anchors[:, None, :] == anchors[None]).all(-1).float().argmax(1)
        onehot[rows, sample.labels] = 1.0
        expected += ops.sigmoid_focal_loss(cls[b][valid], onehot[valid], reduction="sum")
    torch.testing.assert_close(losses["loss_cls"], expected / max(num_pos, 1))
    assert (all_valid["loss_cls"] - losses["loss_cls"]).abs() > 1e-2 * losses["loss_cls"]  # flags matter


def test_rpn_assigns_and_samples_only_valid_anchors():
    gen = torch.Generator().manual_seed(3)
    anchors = [torch.cat([xy, xy + 24], 1) for xy in
               (torch.cartesian_prod(torch.arange(0, 64, 8.0), torch.arange(0, 64, 8.0)) - 12,)]
    logits = [torch.randn(2, anchors[0].shape[0], generator=gen)]
    deltas = [torch.randn(2, anchors[0].shape[0], 4, generator=gen)]
    gts = [torch.tensor([[4.0, 6.0, 30.0, 28.0]]), torch.tensor([[10.0, 2.0, 26.0, 40.0]])]
    seen = []

    def take_all(assigned):  # deterministic: every positive and every negative
        seen.append(assigned.shape[0])
        return (assigned > 0).nonzero()[:, 0], (assigned == 0).nonzero()[:, 0]

    pads = [None, [40, 32]]
    out = rpn_losses(logits, deltas, anchors, gts, take_all, pads)
    valid = anchors_inside_image(anchors[0], pads[1])
    assert seen == [anchors[0].shape[0], int(valid.sum())]
    bce, factor = 0.0, 0
    for b, rows in enumerate([torch.ones_like(valid), valid]):
        assigned = max_iou_assign(anchors[0][rows], gts[b], pos_iou_thr=0.7, neg_iou_thr=0.3,
                                  min_pos_iou=0.3, match_low_quality=True)[0]
        used = assigned >= 0
        bce += F.binary_cross_entropy_with_logits(logits[0][b][rows][used], (assigned[used] > 0).float(),
                                                  reduction="sum")
        factor += max(int((assigned > 0).sum()), 1) + max(int((assigned == 0).sum()), 1)
    torch.testing.assert_close(out["loss_rpn_cls"].sum(), bce / factor)
