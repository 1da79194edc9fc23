"""Train and eval transforms (torchvision.transforms.v2 with tv_tensors.BoundingBoxes).

Train (DINO policy): horizontal flip, then one of
  a) resize the shorter side to a random `scales` value (longer side <= `random_resize_max_size`), or
  b) resize the shorter side to a random `train_random_resize` value, crop a random size in
     [train_random_crop_min, train_random_crop_max], resize as in a).
Train with `fixed_random_crop = S` (LSJ, Co-DINO's recipe): flip, resize a S x S target by a random
ratio in [0.1, 2.0] keeping the aspect ratio, random crop of at most S x S; the collate pads to S.
Eval: resize the shorter side to `test_random_resize` (longer side <= `random_resize_max_size`), or to
exactly `input_size` (h, w) when given.
Every keep-ratio resize rounds its sides as mmcv does (`codetr/data/resize.py`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from codetr.data.resize import KeepRatioResize, LargeScaleJitter
from codetr.spec.schema import AugmentationConfig

LSJ_SCALE_RANGE = (0.1, 2.0)


class RandomSizeCrop(v2.Transform):
    """Crops a random (h, w) with each side uniform in [min_size, max_size] and at most the image's.

    DETR's RandomSizeCrop, except that an image smaller than `min_size` is kept whole on that side
    instead of failing. Boxes are clamped to the crop (and dropped later when empty).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = next(F.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))

        def draw(side: int) -> tuple[int, int]:
            size = int(torch.randint(min(self.min_size, side), min(side, self.max_size) + 1, ()))
            return size, int(torch.randint(0, side - size + 1, ()))

        (crop_h, top), (crop_w, left) = draw(height), draw(width)
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _three(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"{name} must have 1 or 3 values, got {values}")
    return values


class DetectionTransform:
    """Geometric transform + normalisation of one sample.

    Call with image uint8 `[3, H, W]`, boxes float `[N, 4]` xyxy pixels of that image and labels
    int64 `[N]`; returns image float32 `[3, h, w]` normalised by mean/std, boxes `[M, 4]` xyxy pixels
    of the output image and labels `[M]` (M <= N: boxes that became empty are dropped together
    with their labels).
    """

    def __init__(self, geometric: v2.Transform, mean: Sequence[float], std: Sequence[float]) -> None:
        """Combines the geometry with the normalisation.

        Args:
            geometric: a v2 transform of (tv_tensors.Image, {"boxes": BoundingBoxes, "labels"}).
            mean: `input_mean`, 1 or 3 values (RGB, on pixels scaled to [0, 1]).
            std: `input_std`, 1 or 3 values.
        """
        self.geometric = geometric
        self.mean, self.std = _three(mean, "input_mean"), _three(std, "input_std")

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        canvas = tuple(image.shape[-2:])
        target = {"boxes": tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY",
                                                     canvas_size=canvas),
                  "labels": labels}
        image, target = self.geometric(tv_tensors.Image(image), target)
        out_h, out_w = image.shape[-2:]
        out_boxes = target["boxes"].as_subclass(torch.Tensor)
        # Clamp again: resizes do not clamp, and a crop can leave zero-width slivers on the border.
        out_boxes = torch.stack([out_boxes[:, 0].clamp(0, out_w), out_boxes[:, 1].clamp(0, out_h),
                                 out_boxes[:, 2].clamp(0, out_w), out_boxes[:, 3].clamp(0, out_h)], 1)
        keep = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
        pixels = F.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True)
        pixels = F.normalize(pixels, self.mean, self.std)
        return pixels, out_boxes[keep], target["labels"][keep]


def build_geometric(aug: AugmentationConfig, train: bool,
                    input_size: Optional[tuple[int, int]] = None) -> v2.Transform:
    """The resize/crop/flip part of the policy (see the module docstring)."""
    if not train:
        if input_size is not None:
            return v2.Resize(tuple(input_size), antialias=True)
        return KeepRatioResize([aug.test_random_resize], max_size=aug.random_resize_max_size)
    flip = v2.RandomHorizontalFlip(aug.horizontal_flip_prob)
    if aug.fixed_random_crop:
        size = aug.fixed_random_crop
        return v2.Compose([flip, LargeScaleJitter(size, LSJ_SCALE_RANGE), RandomSizeCrop(size, size)])
    final = KeepRatioResize(list(aug.scales), max_size=aug.random_resize_max_size)
    crop = v2.Compose([KeepRatioResize(list(aug.train_random_resize)),
                       RandomSizeCrop(aug.train_random_crop_min, aug.train_random_crop_max), final])
    return v2.Compose([flip, v2.RandomChoice([final, crop])])


def build_transforms(aug: AugmentationConfig, train: bool,
                     input_size: Optional[tuple[int, int]] = None) -> DetectionTransform:
    """The sample transform of a split.

    Args:
        aug: `dataset.augmentation`.
        train: the random train policy, else the deterministic eval resize.
        input_size: (height, width) to resize eval images to exactly (evaluate/inference option).
    """
    return DetectionTransform(build_geometric(aug, train, input_size), aug.input_mean, aug.input_std)


def max_output_size(aug: AugmentationConfig, train: bool,
                    input_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """One (h, w) that bounds every transformed image of any orientation: the eval `input_size`, the
    LSJ crop, else the `random_resize_max_size` square (the LSJ canvases of `test_padding` /
    `train_padding: lsj`). `fixed_padding` pads by orientation instead (`codetr.data.fixed_padding`).
    """
    if input_size is not None and not train:
        return int(input_size[0]), int(input_size[1])
    if train and aug.fixed_random_crop:
        return aug.fixed_random_crop, aug.fixed_random_crop
    return aug.random_resize_max_size, aug.random_resize_max_size


def boxes_to_target(boxes_xyxy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """xyxy pixels `[N, 4]` -> cxcywh normalised by `size` = (h, w) `[N, 4]` (the data contract)."""
    h, w = size
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1).float() / scale
