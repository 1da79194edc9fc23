"""`dataset.augmentation.test_padding: lsj`: mmdet's LSJ test padding (114 pixels, no mask)."""
from __future__ import annotations

import torch

from codetr.data.build import build_collator
from codetr.data.collate import Collator
from codetr.data.test_padding import LSJTestCollator, detection_sizes
from codetr.data.transforms import build_transforms
from codetr.spec.load import spec_from_dict


def _spec(padding: str):
    return spec_from_dict({"dataset": {"augmentation": {
        "test_padding": padding, "test_random_resize": 64, "random_resize_max_size": 64,
        "pad_size_divisor": 32}}})


def _sample(h: int, w: int, spec, seed: int):
    """An eval-transformed random image and the target fields the dataset sets."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    transform = build_transforms(spec.dataset.augmentation, train=False)
    pixels, _, _ = transform(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    return pixels, {"orig_size": torch.tensor([h, w]), "size": torch.tensor(pixels.shape[-2:])}


def test_the_canvas_holds_normalised_114_pixels_and_no_mask():
    spec = _spec("lsj")
    collate = build_collator(spec, "test")
    assert isinstance(collate, LSJTestCollator) and isinstance(build_collator(spec, "val"), LSJTestCollator)
    samples = [_sample(100, 50, spec, 0), _sample(40, 80, spec, 1)]
    batch = collate(samples)
    assert batch.images.shape == (2, 3, 64, 64) and not batch.masks.any()
    # The padding equals what the eval transform makes of a 114 image (mmdet pads before normalising).
    grey = build_transforms(spec.dataset.augmentation, train=False)(
        torch.full((3, 64, 64), 114, dtype=torch.uint8), torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64))[0]
    for i, (pixels, target) in enumerate(samples):
        h, w = pixels.shape[-2:]
        assert torch.equal(batch.images[i, :, :h, :w], pixels)
        pad = batch.images[i, :, h:, :] if h < 64 else batch.images[i, :, :, w:]
        torch.testing.assert_close(pad, grey[:, : pad.shape[1], : pad.shape[2]], atol=1e-6, rtol=0)
        # Boxes normalised by the canvas, back to original pixels: orig_size * canvas / size.
        want = target["orig_size"].float() * 64 / target["size"].float()
        torch.testing.assert_close(detection_sizes(batch.targets)[i], want)
    # 100x50 is resized to 64x32: the whole image is xyxy [0, 0, 0.5, 1] of the 64x64 canvas, and
    # scaled by (w, h) = detection_size it is the whole original image again.
    h, w = detection_sizes(batch.targets)[0].tolist()
    assert samples[0][1]["size"].tolist() == [64, 32]
    assert [0.5 * w, 1.0 * h] == [50.0, 100.0]


def test_the_default_and_training_keep_zero_padding_with_a_mask():
    for spec, split in ((_spec("mask"), "test"), (_spec("lsj"), "train")):
        collate = build_collator(spec, split)
        assert isinstance(collate, Collator) and not isinstance(collate, LSJTestCollator)
    spec = _spec("mask")
    batch = build_collator(spec, "test")([_sample(100, 50, spec, 0), _sample(40, 80, spec, 1)])
    assert batch.masks.any() and "detection_size" not in batch.targets[0]
    assert torch.equal(detection_sizes(batch.targets), torch.tensor([[100.0, 50.0], [40.0, 80.0]]))
