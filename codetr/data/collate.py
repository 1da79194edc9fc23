"""Batching: zero-pad images to one size and mark the padding in a mask (True = padding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Batch:
    """A training/evaluation batch (docs/DESIGN.md data contract).

    Attributes:
        images: float32 `[B, 3, H, W]` normalised, zero-padded at the bottom/right.
        masks: bool `[B, H, W]`, True on padding.
        targets: B dicts: boxes float32 `[N, 4]` cxcywh normalised by `size`, labels int64 `[N]`,
            image_id int, orig_size int64 `[2]` (h, w), size int64 `[2]` (h, w), and pad_size
            `(h, w)` Python ints (not moved to the device: reading it costs no host sync), the
            image's own padded extent as mmdet's data preprocessor gives it (`size` rounded up
            to the divisor; zero padding beyond it, fixed or not, is no image): the co-heads'
            anchors beyond it are invalid, as mmdet's valid flags make them.
            LSJ training pads with image content instead (`LSJTrainCollator`: the canvas).
    """
    images: torch.Tensor
    masks: torch.Tensor
    targets: list[dict]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor (targets included) on `device`."""
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.masks.to(device, non_blocking=non_blocking),
                     [{k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                       for k, v in t.items()} for t in self.targets])

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        return Batch(self.images.pin_memory(), self.masks.pin_memory(),
                     [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in t.items()}
                      for t in self.targets])


@dataclass
class ImageBatch:
    """An inference batch: images `[B, 3, H, W]`, masks `[B, H, W]` (True = padding) and the
    per-image `metas` of `ImageFolderDataset` (path, relative_path, orig_size, size)."""
    images: torch.Tensor
    masks: torch.Tensor
    metas: list[dict]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ImageBatch":
        """A copy with images and masks on `device` (metas stay on the CPU)."""
        return ImageBatch(self.images.to(device, non_blocking=non_blocking),
                          self.masks.to(device, non_blocking=non_blocking), self.metas)


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def pad_images(images: Sequence[torch.Tensor], pad_size_divisor: int = 1,
               fixed_size: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads `[3, h_i, w_i]` images at the bottom/right to one size.

    The size is the batch maximum (or `fixed_size`), rounded up to a multiple of `pad_size_divisor`.

    Returns:
        images `[B, 3, H, W]` and masks bool `[B, H, W]` (True on padding).
    """
    if not images:
        raise ValueError("cannot collate an empty batch")
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    if fixed_size is not None:
        if height > fixed_size[0] or width > fixed_size[1]:
            raise ValueError(f"an image of {height}x{width} does not fit the fixed padding size "
                             f"{fixed_size[0]}x{fixed_size[1]}")
        height, width = fixed_size
    height, width = _round_up(height, pad_size_divisor), _round_up(width, pad_size_divisor)
    out = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        out[i, :, :h, :w] = im
        masks[i, :h, :w] = False
    return out, masks


class Collator:
    """`collate_fn` of a DataLoader: picklable (workers) and configured once per split."""

    def __init__(self, pad_size_divisor: int = 1, fixed_size: Optional[tuple[int, int]] = None) -> None:
        """Configures the padding.

        Args:
            pad_size_divisor: H and W are rounded up to a multiple of it.
            fixed_size: (H, W) every batch is padded to (then rounded up to the divisor); None pads
                to the batch maximum.
        """
        if pad_size_divisor < 1:
            raise ValueError(f"pad_size_divisor must be >= 1, got {pad_size_divisor}")
        self.pad_size_divisor = pad_size_divisor
        self.fixed_size = None if fixed_size is None else (int(fixed_size[0]), int(fixed_size[1]))

    def __call__(self, samples: Sequence[tuple[torch.Tensor, dict]]) -> Batch:
        return collate_fn(samples, self.pad_size_divisor, self.fixed_size)

    def images(self, samples: Sequence[tuple[torch.Tensor, dict]]) -> ImageBatch:
        """The inference variant: samples of `ImageFolderDataset`."""
        images, masks = pad_images([s[0] for s in samples], self.pad_size_divisor, self.fixed_size)
        return ImageBatch(images, masks, [s[1] for s in samples])


def collate_fn(samples: Sequence[tuple[torch.Tensor, dict]], pad_size_divisor: int = 1,
               fixed_size: Optional[tuple[int, int]] = None) -> Batch:
    """(image `[3, h, w]`, target) pairs -> `Batch` (see `pad_images` for the padded size)."""
    images, masks = pad_images([s[0] for s in samples], pad_size_divisor, fixed_size)
    return Batch(images, masks, [dict(s[1], pad_size=pad_size(s[1]["size"], pad_size_divisor))
                                 for s in samples])


def pad_size(size: torch.Tensor, pad_size_divisor: int = 1) -> tuple[int, int]:
    """mmdet's per-image `pad_shape`: `(h, w)`, `size` rounded up to the divisor."""
    return _round_up(int(size[0]), pad_size_divisor), _round_up(int(size[1]), pad_size_divisor)
