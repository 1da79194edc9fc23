"""Contrastive denoising queries: layout, attention mask, noise ranges, mmdet's random draws."""
import math

import pytest
import torch
from torch import nn

from codetr.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from codetr.model.denoising import build_denoising_queries, denoising_attn_mask


def _dino_mask(groups: int, max_gt: int, num_queries: int) -> torch.Tensor:
    """DINO's `prepare_for_cdn` mask, built with its explicit loop (the reference)."""
    single = max_gt
    pad = single * 2 * groups
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool)
    mask[pad:, :pad] = True
    for i in range(groups):
        if i == 0:
            mask[single * 2 * i:single * 2 * (i + 1), single * 2 * (i + 1):pad] = True
        if i == groups - 1:
            mask[single * 2 * i:single * 2 * (i + 1), :single * i * 2] = True
        else:
            mask[single * 2 * i:single * 2 * (i + 1), single * 2 * (i + 1):pad] = True
            mask[single * 2 * i:single * 2 * (i + 1), :single * 2 * i] = True
    return mask


def _targets(counts, generator):
    out = []
    for n in counts:
        cxcy = torch.rand(n, 2, generator=generator) * 0.4 + 0.3
        wh = torch.rand(n, 2, generator=generator) * 0.1 + 0.05
        out.append({"labels": torch.randint(0, 7, (n,), generator=generator), "boxes": torch.cat([cxcy, wh], 1)})
    return out


def test_mask_matches_dino_loop():
    for groups, max_gt, queries in [(1, 3, 4), (3, 2, 5), (5, 1, 7)]:
        got = denoising_attn_mask(groups, max_gt, queries, torch.device("cpu"))
        assert torch.equal(got, _dino_mask(groups, max_gt, queries))


def test_mask_semantics():
    mask = denoising_attn_mask(3, 2, 5, torch.device("cpu"))
    pad = 12
    assert mask[pad:, :pad].all()  # matching queries never see denoising ones
    assert not mask[:, pad:].any()  # everyone sees the matching queries
    assert not mask[pad:, pad:].any()
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        assert not mask[rows, 4 * g:4 * g + 4].any()  # a group sees itself
        others = [c for c in range(pad) if not 4 * g <= c < 4 * g + 4]
        assert mask[rows][:, others].all()  # and no other group


def test_layout_without_noise():
    gen = torch.Generator().manual_seed(1)
    targets = _targets([3, 1, 0], gen)
    embedding = nn.Embedding(7, 16)
    dn = build_denoising_queries(targets, embedding, 7, 10, 7, 0.0, 0.0)
    assert dn.meta == {"num_groups": 2, "max_gt": 3, "pad_size": 12}
    assert dn.content.shape == (3, 12, 16) and dn.reference_unsig.shape == (3, 12, 4)
    assert dn.attn_mask.shape == (22, 22)
    for i, t in enumerate(targets):
        n = t["labels"].numel()
        for g in range(2):
            for sign in range(2):
                for j in range(3):
                    q = g * 6 + sign * 3 + j
                    if j < n:
                        torch.testing.assert_close(dn.content[i, q], embedding.weight[t["labels"][j]])
                        torch.testing.assert_close(dn.reference_unsig[i, q].sigmoid(), t["boxes"][j], atol=1e-5, rtol=0)
                    else:
                        assert not dn.content[i, q].any() and not dn.reference_unsig[i, q].any()


def test_box_noise_ranges():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    targets = _targets([40, 25], gen)
    dn = build_denoising_queries(targets, nn.Embedding(7, 8), 7, 4, 120, 0.0, 1.0)
    groups, max_gt = dn.meta["num_groups"], dn.meta["max_gt"]
    assert groups == 3
    boxes = dn.reference_unsig.sigmoid().view(2, groups, 2, max_gt, 4)
    for i, t in enumerate(targets):
        n = t["labels"].numel()
        gt = t["boxes"]
        half = gt[:, 2:].repeat(1, 2) / 2  # (w/2, h/2, w/2, h/2)
        # Centres 0.3..0.7 and sizes <= 0.15 keep noisy corners inside [0, 1]: no clamping.
        noisy = boxes[i, :, :, :n]
        rel = (box_cxcywh_to_xyxy(noisy) - box_cxcywh_to_xyxy(gt)).abs() / half
        # Negatives may cross their corners (x1 > x2): the width is then clamped to ~0 by the
        # inverse sigmoid (as in DINO) and the corners are no longer recoverable; skip those.
        kept = (noisy[..., 2:] > 2e-3).all(-1, keepdim=True).expand_as(rel)
        pos, neg = rel[:, 0][kept[:, 0]], rel[:, 1][kept[:, 1]]
        assert kept[:, 0].all() and kept[:, 1].float().mean() > 0.5
        assert pos.max() < 1.0 + 1e-3 and neg.min() > 1.0 - 1e-3 and neg.max() < 2.0 + 1e-3
        assert pos.min() < 0.1 and neg.max() > 1.9  # the ranges are covered, not just bounded


def test_label_noise_rate():
    torch.manual_seed(0)
    num_classes = 4
    targets = [{"labels": torch.zeros(50, dtype=torch.long), "boxes": torch.full((50, 4), 0.5)}]
    embedding = nn.Embedding(num_classes, 8)
    dn = build_denoising_queries(targets, embedding, num_classes, 3, 2000, 1.0, 0.0)
    labels = torch.cdist(dn.content[0], embedding.weight).argmin(-1)  # recover the noisy labels
    changed = (labels != 0).float().mean().item()
    # Flip probability 0.5, and a flip draws the original class 1/C of the time.
    assert abs(changed - 0.5 * (1 - 1 / num_classes)) < 0.03


def test_no_ground_truth_gives_no_queries():
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert build_denoising_queries(targets, nn.Embedding(3, 8), 3, 5, 100, 0.5, 1.0) is None


def test_at_least_one_group():
    gen = torch.Generator().manual_seed(3)
    dn = build_denoising_queries(_targets([9], gen), nn.Embedding(7, 8), 7, 5, 4, 0.5, 1.0)
    assert dn.meta == {"num_groups": 1, "max_gt": 9, "pad_size": 18}


def _mmdet_cdn(targets, embedding, num_classes, dn_number, label_noise_ratio, box_noise_scale):
    """The reference: mmdet 3.3 `CdnQueryGenerator.__call__`'s steps, on its own flat layout.

    The batch's gts form one list of N; it is repeated 2G times (row `k * N + t`; rows
    `2g * N + t` are group g's positives, `(2g + 1) * N + t` its negatives), the label and box
    noise are drawn over that list in this order, and `collate_dn_queries` puts copy k of image
    i's j-th gt at query `k * M + j` of image i; the other queries stay zero.
    """
    counts = [len(t["labels"]) for t in targets]
    max_gt, total = max(counts), sum(counts)
    groups = max(dn_number // max_gt, 1)
    copies = 2 * groups
    labels = torch.cat([t["labels"] for t in targets]).repeat(copies, 1).view(-1)
    chosen = torch.nonzero(torch.rand_like(labels.float()) < label_noise_ratio * 0.5).view(-1)
    labels = labels.scatter(0, chosen, torch.randint_like(chosen, 0, num_classes))
    corners = box_cxcywh_to_xyxy(torch.cat([t["boxes"] for t in targets])).repeat(copies, 1)
    positive_rows = (torch.arange(total)[None] + 2 * total * torch.arange(groups)[:, None]).flatten()
    sign = torch.randint_like(corners, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
    part = torch.rand_like(corners)
    part[positive_rows + total] += 1.0
    part *= sign
    whwh = (corners[:, 2:] - corners[:, :2]).repeat(1, 2)
    noisy = (corners + part * whwh * box_noise_scale / 2).clamp(min=0.0, max=1.0)
    logits = inverse_sigmoid(box_xyxy_to_cxcywh(noisy), eps=1e-3)
    content = torch.zeros(len(targets), copies * max_gt, embedding.weight.shape[1])
    reference = torch.zeros(len(targets), copies * max_gt, 4)
    image = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)]).repeat(copies)
    query = torch.cat([torch.arange(n) for n in counts]).repeat(copies)
    query = query + max_gt * torch.arange(copies).repeat_interleave(total)
    content[image, query] = embedding(labels)
    reference[image, query] = logits
    return content, reference


def _border_targets(counts, generator, num_classes):
    """Random boxes, a third of them touching the border, so that noisy corners get clamped."""
    out = []
    for n in counts:
        x1y1 = torch.rand(n, 2, generator=generator) * 0.8
        x2y2 = x1y1 + torch.rand(n, 2, generator=generator) * 0.3 + 0.01
        x1y1[::3] = 0.0
        xyxy = torch.cat([x1y1, x2y2.clamp(max=1.0)], 1)
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=generator),
                    "boxes": box_xyxy_to_cxcywh(xyxy)})
    return out


@pytest.mark.parametrize("counts,dn_number,seed", [([3, 0, 2], 20, 0), ([7, 5], 100, 1), ([1], 3, 2)])
def test_noise_is_drawn_as_mmdet_draws_it(counts, dn_number, seed):
    """One seed gives mmdet's noisy queries: same draws, same order, same layout and eps."""
    generator = torch.Generator().manual_seed(100 + seed)
    targets = _border_targets(counts, generator, 6)
    embedding = nn.Embedding(6, 8)
    torch.manual_seed(seed)
    content, reference = _mmdet_cdn(targets, embedding, 6, dn_number, 0.5, 1.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        dn = build_denoising_queries(targets, embedding, 6, 10, dn_number, 0.5, 1.0)
    assert dn.content.shape == content.shape
    torch.testing.assert_close(dn.content, content, rtol=0, atol=0)
    # The noise scale is computed from the cxcywh width here and from the corners there: ~1e-7.
    torch.testing.assert_close(dn.reference_unsig, reference, rtol=0, atol=1e-5)
    if sum(counts) > 1:  # negatives whose corners crossed and were clamped: the eps is exercised
        assert (reference.sigmoid() < 2e-3).any()


def test_border_boxes_start_at_the_denoising_eps():
    """mmdet's `inverse_sigmoid(..., eps=1e-3)`: a coordinate within 1e-3 of 0 or 1 is clamped."""
    boxes = torch.tensor([[0.0002, 0.5, 0.0004, 0.2], [0.5, 0.9999, 0.4, 0.0002]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes}]
    dn = build_denoising_queries(targets, nn.Embedding(3, 8), 3, 5, 2, 0.0, 0.0)

    def mmdet_logit(x, eps):
        return math.log(max(x, eps) / max(1 - x, eps))

    for j, near_border in ((0, 0), (1, 3)):
        expected = torch.tensor([mmdet_logit(v, 1e-3) for v in boxes[j].tolist()])
        torch.testing.assert_close(dn.reference_unsig[0, j], expected, rtol=0, atol=1e-5)
        assert abs(mmdet_logit(boxes[j, near_border].item(), 1e-5) - expected[near_border]) > 0.5  # 1e-5 would differ


def test_an_empty_image_with_float_labels_does_not_change_the_label_type():
    """`torch.zeros(0)` labels (float) for an image without boxes: labels stay class indices."""
    targets = _targets([2], torch.Generator().manual_seed(4)) + [
        {"labels": torch.zeros(0), "boxes": torch.zeros(0, 4)}]
    embedding = nn.Embedding(7, 8)
    dn = build_denoising_queries(targets, embedding, 7, 5, 4, 0.5, 1.0)
    assert dn.content.shape == (2, 8, 8) and not dn.content[1].any()
