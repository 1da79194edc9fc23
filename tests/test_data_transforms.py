"""Transforms: geometry of boxes vs image, crops dropping boxes with their labels, size policies."""
import numpy as np
import pytest
import torch
from torchvision.ops import box_convert
from torchvision.transforms import v2

from codetr.data.transforms import (DetectionTransform, RandomSizeCrop, boxes_to_target,
                                    build_transforms, max_output_size)
from codetr.spec.schema import AugmentationConfig

IDENTITY = dict(mean=[0.0], std=[1.0])


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """uint8 [3, H, W] whose channel 0 is x and channel 1 is y (sizes < 256), so a crop's offset
    can be read back from its top-left pixel."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    noise = torch.randint(0, 256, (height, width))
    return torch.stack([xs, ys, noise]).to(torch.uint8)


def random_xyxy(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width - 2, height - 2])
    wh = 1 + torch.rand(n, 2, generator=g) * torch.tensor([width, height]) / 2
    xyxy = torch.cat([xy, xy + wh], 1)
    return torch.minimum(xyxy, torch.tensor([width, height, width, height], dtype=torch.float32))


def test_flip_moves_boxes_with_pixels():
    image = coordinate_image(30, 50)
    boxes, labels = random_xyxy(6, 30, 50, 0), torch.arange(6)
    out, out_boxes, out_labels = DetectionTransform(v2.RandomHorizontalFlip(1.0), **IDENTITY)(
        image, boxes, labels)
    assert torch.allclose(out * 255, image.flip(-1).float(), atol=1e-3)
    expected = torch.stack([50 - boxes[:, 2], boxes[:, 1], 50 - boxes[:, 0], boxes[:, 3]], 1)
    assert torch.allclose(out_boxes, expected) and torch.equal(out_labels, labels)


def test_normalisation_one_or_three_values():
    image = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    three = DetectionTransform(v2.Identity(), [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])(image, *empty)[0]
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert torch.allclose(three, (image.float() / 255 - mean) / std, atol=1e-5)
    one = DetectionTransform(v2.Identity(), [0.5], [0.25])(image, *empty)[0]
    assert torch.allclose(one, (image.float() / 255 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="input_std must have 1 or 3"):
        DetectionTransform(v2.Identity(), [0.5], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(6))
def test_crop_drops_empty_boxes_keeps_labels_aligned(seed):
    torch.manual_seed(seed)
    h, w = 60, 80
    image = coordinate_image(h, w)
    boxes = random_xyxy(12, h, w, seed)
    labels = torch.randint(0, 90, (12,))
    out, out_boxes, out_labels = DetectionTransform(RandomSizeCrop(20, 40), **IDENTITY)(image, boxes, labels)
    left, top = int(round(float(out[0, 0, 0]) * 255)), int(round(float(out[1, 0, 0]) * 255))
    ch, cw = out.shape[-2:]
    assert 20 <= ch <= 40 and 20 <= cw <= 40
    shifted = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
    clamped = torch.stack([shifted[:, 0].clamp(0, cw), shifted[:, 1].clamp(0, ch),
                           shifted[:, 2].clamp(0, cw), shifted[:, 3].clamp(0, ch)], 1)
    keep = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
    assert torch.allclose(out_boxes, clamped[keep], atol=1e-4)
    assert torch.equal(out_labels, labels[keep])


def test_crop_smaller_image_than_min_is_kept_whole():
    image = coordinate_image(10, 12)
    out, _, _ = DetectionTransform(RandomSizeCrop(20, 40), **IDENTITY)(
        image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert out.shape[-2:] == (10, 12)


@pytest.mark.parametrize("height, width", [(37, 91), (120, 45), (64, 64)])
def test_eval_resize_shorter_side_with_cap_and_box_scaling(height, width):
    aug = AugmentationConfig(test_random_resize=48, random_resize_max_size=100)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    boxes = random_xyxy(5, height, width, height)
    out, out_boxes, labels = build_transforms(aug, train=False)(image, boxes, torch.arange(5))
    oh, ow = out.shape[-2:]
    scale = min(48 / min(height, width), 100 / max(height, width))
    assert (oh, ow) == (int(height * scale + 0.5), int(width * scale + 0.5))  # mmcv rounds
    factors = torch.tensor([ow / width, oh / height, ow / width, oh / height])
    assert torch.allclose(out_boxes, boxes * factors, atol=1e-3)
    assert torch.equal(labels, torch.arange(5))
    exact, _, _ = build_transforms(aug, train=False, input_size=(40, 56))(image, boxes, torch.arange(5))
    assert exact.shape == (3, 40, 56)


def test_train_policy_sizes_and_boxes_inside():
    aug = AugmentationConfig(scales=[64, 80, 96], train_random_resize=[70, 90], train_random_crop_min=40,
                             train_random_crop_max=60, random_resize_max_size=150)
    transform = build_transforms(aug, train=True)
    torch.manual_seed(0)
    shorter, bound = set(), max_output_size(aug, train=True)
    for i in range(30):
        h, w = int(torch.randint(50, 130, ())), int(torch.randint(50, 130, ()))
        out, boxes, labels = transform(torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                                       random_xyxy(8, h, w, i), torch.arange(8))
        oh, ow = out.shape[-2:]
        assert oh <= bound[0] and ow <= bound[1] and max(oh, ow) <= 150
        shorter.add(min(oh, ow))
        assert len(boxes) == len(labels)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= ow).all() and (boxes[:, 3] <= oh).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert {64, 80, 96} & shorter and len(shorter) >= 2  # random scales really vary


def test_lsj_crops_at_most_fixed_size():
    aug = AugmentationConfig(fixed_random_crop=64, horizontal_flip_prob=0.5)
    transform = build_transforms(aug, train=True)
    torch.manual_seed(1)
    sizes = set()
    for i in range(25):
        h, w = int(torch.randint(30, 100, ())), int(torch.randint(30, 100, ()))
        out, boxes, labels = transform(torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                                       random_xyxy(5, h, w, i), torch.arange(5))
        assert out.shape[-2] <= 64 and out.shape[-1] <= 64 and len(boxes) == len(labels)
        sizes.add(tuple(out.shape[-2:]))
    assert (64, 64) in sizes and any(max(s) < 64 for s in sizes)  # big ratios crop, small ones don't
    assert max_output_size(aug, train=True) == (64, 64)


def test_boxes_to_target_matches_torchvision():
    boxes = random_xyxy(10, 40, 70, 9)
    ours = boxes_to_target(boxes, (40, 70))
    ref = box_convert(boxes, "xyxy", "cxcywh") / torch.tensor([70, 40, 70, 40])
    assert torch.allclose(ours, ref, atol=1e-6)
    assert boxes_to_target(torch.zeros(0, 4), (5, 5)).shape == (0, 4)
    assert np.all((ours.numpy() >= 0) & (ours.numpy() <= 1))
