"""`dataset.augmentation.fixed_padding`: TAO's FixedPad, each image to a size set by its orientation.

TAO's DINO data pipeline (which Co-DETR reuses, seeds 000/001) ends the train transform with
`FixedPad(max(scales), random_resize_max_size)` and the eval transform with
`FixedPad(test_random_resize, random_resize_max_size)`: a landscape image (h <= w) is padded to
short x long, a portrait one (h > w) to long x short; the batch is then padded to its maximum (and
here to `pad_size_divisor`). With the defaults a batch of landscape photos is 800 x 1333, not the
1333 x 1333 square one bound for both orientations would give (1.67x the pixels).

The bound is safe: every train branch ends with `KeepRatioResize(scales, max_size)` (the crop
branch resizes AFTER its crop), the eval transform is `KeepRatioResize([test_random_resize],
max_size)`, and mmcv's rounding never exceeds a target (`keep_ratio_size`): the shorter output side
is at most the scale, the longer at most `random_resize_max_size`. LSJ training
(`fixed_random_crop`) and an explicit eval `input_size` keep one fixed shape (`max_output_size`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codetr.data.collate import Batch, Collator, ImageBatch, collate_fn, pad_images
from codetr.data.transforms import max_output_size
from codetr.spec.errors import SpecError
from codetr.spec.schema import AugmentationConfig


def fixed_pad_sides(aug: AugmentationConfig, train: bool) -> tuple[int, int]:
    """(short, long) of TAO's FixedPad: (max(scales) for train or test_random_resize for eval,
    random_resize_max_size)."""
    short = max(aug.scales) if train else aug.test_random_resize
    return int(short), int(aug.random_resize_max_size)


class OrientedPadCollator(Collator):
    """Pads each image to (short, long) if landscape (h <= w), (long, short) if portrait, then the
    batch to its maximum and to `pad_size_divisor` (zero padding, masked, as `Collator`).

    Args:
        short, long: the sides of `fixed_pad_sides`.
        pad_size_divisor: as for `Collator`.
        where: the spec keys of `short` (named when an image does not fit).
    """

    def __init__(self, short: int, long: int, pad_size_divisor: int = 1, where: str = "") -> None:
        super().__init__(pad_size_divisor)
        if short <= 0 or long <= 0:
            raise ValueError(f"fixed padding sides must be positive, got short={short}, long={long}")
        self.short, self.long, self.where = int(short), int(long), where

    def image_bound(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an image of that size is padded to (before the batch maximum)."""
        return (self.long, self.short) if height > width else (self.short, self.long)

    def batch_size(self, images: Sequence[torch.Tensor]) -> tuple[int, int]:
        """The (H, W) before the divisor: the maximum of the images' bounds.

        Raises:
            SpecError: an image exceeds its bound (the transforms broke the rule above).
        """
        if not images:
            raise ValueError("cannot collate an empty batch")
        height = width = 0
        for im in images:
            h, w = (int(s) for s in im.shape[-2:])
            bound = self.image_bound(h, w)
            if h > bound[0] or w > bound[1]:
                raise SpecError(f"an image of {h}x{w} does not fit the fixed padding {bound[0]}x"
                                f"{bound[1]} ({self.where}, dataset.augmentation.random_resize_max_size)")
            height, width = max(height, bound[0]), max(width, bound[1])
        return height, width

    def __call__(self, samples: Sequence[tuple[torch.Tensor, dict]]) -> Batch:
        return collate_fn(samples, self.pad_size_divisor, self.batch_size([s[0] for s in samples]))

    def images(self, samples: Sequence[tuple[torch.Tensor, dict]]) -> ImageBatch:
        images = [s[0] for s in samples]
        padded, masks = pad_images(images, self.pad_size_divisor, self.batch_size(images))
        return ImageBatch(padded, masks, [s[1] for s in samples])


def fixed_padding_collator(aug: AugmentationConfig, train: bool,
                           input_size: Optional[tuple[int, int]] = None) -> Collator:
    """The collator of `fixed_padding` (or LSJ training): one fixed shape for LSJ training and an
    explicit eval `input_size`, else TAO's per-orientation `OrientedPadCollator`."""
    if (train and aug.fixed_random_crop) or (not train and input_size is not None):
        return Collator(aug.pad_size_divisor, max_output_size(aug, train, input_size))
    where = "dataset.augmentation." + ("scales" if train else "test_random_resize")
    return OrientedPadCollator(*fixed_pad_sides(aug, train), aug.pad_size_divisor, where)
