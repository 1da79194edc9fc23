"""`dataset.augmentation.test_padding` / `train_padding`: how batches are padded.

- `mask` (default, codetr's DETR convention): zero padding after normalisation, a padding mask,
  boxes normalised by each image's own size (`codetr.data.collate`).
- `lsj`: mmdet's LSJ test pipeline (the official Co-DINO R50 / Swin-L LSJ configs): every image is
  padded to the square canvas (`random_resize_max_size`, or the fixed eval size) with pixel value
  114 BEFORE normalisation. The padding is image content: there is no mask (all False), so the
  model normalises its boxes by the canvas, and the boxes go back to original-image pixels by
  canvas / scale factor. mmcv's `Pad` sets `img_shape` to the canvas, which is where mmdet gets
  this; the official LSJ weights were evaluated (52.0 AP for R50) this way.

Both collators put the (h, w) the normalised boxes are scaled by into each target / meta as
`detection_size` (float32 `[2]`); `detection_sizes` reads it for the post-processing.

`train_padding: lsj` (`LSJTrainCollator`) is the same in training, as mmdet's LSJ train pipeline
ends with `Pad(size=canvas, pad_val=114)`: the canvas is the image (no mask), and the targets are
re-normalised by it (`size` and `pad_size` become the canvas), so the losses, the denoising
queries, the co-heads' anchors (all valid) and their positive queries see mmdet's frame.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from codetr.spec.errors import SpecError

from codetr.data.collate import Batch, Collator, ImageBatch, _round_up

TEST_PADDINGS = ("mask", "lsj")
LSJ_PAD_PIXEL = 114  # mmdet LSJ configs: Pad(..., pad_val=dict(img=(114, 114, 114)))


def lsj_pad_values(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalised value `[3]` of a 114 pixel: what the canvas holds outside the image."""
    mean_t = torch.tensor([float(m) for m in mean]).expand(3)
    std_t = torch.tensor([float(s) for s in std]).expand(3)
    return (LSJ_PAD_PIXEL / 255.0 - mean_t) / std_t


def lsj_detection_size(orig_size: torch.Tensor, size: torch.Tensor,
                       canvas: Sequence[int]) -> torch.Tensor:
    """orig_size * canvas / size, float32 `[2]` (h, w): the frame of canvas-normalised boxes."""
    return orig_size.float() * torch.tensor([float(canvas[0]), float(canvas[1])]) / size.float()


def detection_sizes(items: Sequence[Mapping]) -> torch.Tensor:
    """`[B, 2]` (h, w) to scale each image's normalised boxes by (`PostProcess` orig_sizes).

    `detection_size` when the collator set one (LSJ), else `orig_size`.
    """
    return torch.stack([torch.as_tensor(d.get("detection_size", d["orig_size"])).float()
                        for d in items])


class LSJTestCollator(Collator):
    """Pads to one canvas with the normalised 114 pixel, no mask; sets `detection_size`.

    Args:
        canvas: (H, W) every batch is padded to (rounded up to `pad_size_divisor`).
        pad_size_divisor: as for `Collator`.
        mean: `input_mean` (1 or 3 values, pixels in [0, 1]).
        std: `input_std`.
    """

    def __init__(self, canvas: tuple[int, int], pad_size_divisor: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__(pad_size_divisor, canvas)
        self.canvas = (_round_up(int(canvas[0]), pad_size_divisor),
                       _round_up(int(canvas[1]), pad_size_divisor))
        self.values = lsj_pad_values(mean, std)

    def _pad(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = self.canvas
        out = self.values.to(images[0].dtype)[None, :, None, None].repeat(len(images), 1, height, width)
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            if h > height or w > width:
                raise SpecError(f"an image of {h}x{w} does not fit the LSJ test canvas "
                                 f"{height}x{width} (dataset.augmentation.random_resize_max_size)")
            out[i, :, :h, :w] = im
        return out, torch.zeros((len(images), height, width), dtype=torch.bool)

    def _with_size(self, item: dict) -> dict:
        return dict(item, detection_size=lsj_detection_size(item["orig_size"], item["size"], self.canvas))

    def __call__(self, samples: Sequence[tuple[torch.Tensor, dict]]) -> Batch:
        images, masks = self._pad([s[0] for s in samples])
        return Batch(images, masks, [self._with_size(s[1]) for s in samples])

    def images(self, samples: Sequence[tuple[torch.Tensor, dict]]) -> ImageBatch:
        images, masks = self._pad([s[0] for s in samples])
        return ImageBatch(images, masks, [self._with_size(s[1]) for s in samples])


class LSJTrainCollator(LSJTestCollator):
    """`train_padding: lsj`: the LSJ canvas with the 114 pixel, no mask, targets in its frame.

    Each target's cxcywh boxes (normalised by its `size`) are re-normalised by the canvas, and
    `size` / `pad_size` become the canvas: the pixel boxes do not move.
    """

    def __call__(self, samples: Sequence[tuple[torch.Tensor, dict]]) -> Batch:
        images, masks = self._pad([s[0] for s in samples])
        canvas = torch.tensor(self.canvas)
        targets = []
        for _, item in samples:
            scale = (item["size"].float() / canvas.float()).flip(0).repeat(2)  # (w, h, w, h)
            targets.append(dict(item, boxes=item["boxes"] * scale.to(item["boxes"].dtype),
                                size=canvas.clone(), pad_size=tuple(self.canvas)))
        return Batch(images, masks, targets)
