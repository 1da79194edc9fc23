"""Keep-ratio resizes: mmcv's size rule, torchvision's random draws (codetr/data/resize.py)."""
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from codetr.data.resize import KeepRatioResize, LargeScaleJitter, keep_ratio_size
from codetr.data.transforms import build_transforms
from codetr.spec.schema import AugmentationConfig


def _mmcv_rescale_size(width, height, scale):
    """The reference: mmcv 2.x `rescale_size((w, h), scale)` for a (long, short) tuple scale,
    transcribed (`_scale_size` rounds with `int(x + 0.5)`)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def test_the_size_rule_is_mmcvs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        h, w = (int(v) for v in torch.randint(16, 2000, (2,), generator=generator))
        short = int(torch.randint(100, 1100, (), generator=generator))
        long_max = int(torch.randint(short, 2000, (), generator=generator))
        width, height = _mmcv_rescale_size(w, h, (long_max, short))
        assert keep_ratio_size(h, w, short, long_max) == (height, width)
        assert max(height, width) <= long_max
    # COCO's commonest size, 640 x 480: the longer side 1066.67 rounds to 1067 (torchvision: 1066);
    # 640 x 335: 335 * (800 / 335) = 799.99... short of 800 (torchvision: 799 rows).
    for (h, w), rounded, truncated in (((480, 640), (800, 1067), (800, 1066)),
                                       ((335, 640), (800, 1528), (799, 1528))):
        assert keep_ratio_size(h, w, 800, 2000) == rounded
        image = tv_tensors.Image(torch.zeros(3, h, w))
        assert v2.RandomShortestSize([800], max_size=2000).make_params([image])["size"] == truncated
    assert keep_ratio_size(480, 640, 500) == (500, 667)  # no cap on the longer side


@pytest.mark.parametrize("square", [True, False])
def test_random_draws_are_torchvisions(square):
    """The same choices from the same seed: square images (exact sizes) come out identical."""
    size = (96, 96) if square else (96, 131)
    image = tv_tensors.Image(torch.randint(0, 256, (3, *size), dtype=torch.uint8))
    pairs = [(KeepRatioResize([64, 80, 128], max_size=150), v2.RandomShortestSize([64, 80, 128], max_size=150)),
             (LargeScaleJitter(100, (0.1, 2.0)), v2.ScaleJitter((100, 100), (0.1, 2.0)))]
    for ours, theirs in pairs:
        for seed in range(20):
            torch.manual_seed(seed)
            got = ours.make_params([image])["size"]
            after_ours = torch.rand(())
            torch.manual_seed(seed)
            expected = theirs.make_params([image])["size"]
            assert torch.equal(after_ours, torch.rand(()))  # the same number of draws
            if square:
                assert got == expected
            else:
                assert all(abs(a - b) <= 1 for a, b in zip(got, expected))


def test_lsj_target_side_is_truncated_then_fitted():
    """mmdet's RandomResize(ratio_range): target side int(size * ratio), then the keep-ratio rule."""
    image = tv_tensors.Image(torch.zeros(3, 427, 640))
    torch.manual_seed(3)
    ratio = float(0.1 + torch.rand(1) * 1.9)
    torch.manual_seed(3)
    got = LargeScaleJitter(1024, (0.1, 2.0)).make_params([image])["size"]
    target = int(1024 * ratio)
    assert got == (int(427 * target / 640 + 0.5), int(640 * target / 640 + 0.5))


def test_boxes_follow_the_rounded_size():
    aug = AugmentationConfig(test_random_resize=800, random_resize_max_size=1333)
    transform = build_transforms(aug, train=False)
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 630.0, 420.0], [0.0, 0.0, 640.0, 480.0]])
    pixels, out_boxes, labels = transform(image, boxes, torch.tensor([1, 2]))
    assert tuple(pixels.shape[-2:]) == (800, 1067)  # mmdet's size (torchvision's rule: 1066)
    scale = torch.tensor([1067 / 640, 800 / 480, 1067 / 640, 800 / 480])
    torch.testing.assert_close(out_boxes, boxes * scale, rtol=1e-6, atol=1e-4)
    assert labels.tolist() == [1, 2]
