"""Keep-ratio resizes with mmcv's size rule (`mmcv.rescale_size`, as mmdet's Co-DETR configs resize).

This is NOT the rule of TAO's DINO data pipeline, which TAO's Co-DETR reuses (seed 000): DINO's
`RandomResize` (DETR's `get_size`) truncates the longer side, so it can differ from ours by 1 px,
e.g. a 480 x 640 image at shorter side 800 is 800 x 1066 there and 800 x 1067 here. The rounding
is kept: the trained default and the mmdet reference tests depend on it.

mmcv's `rescale_size` scales an (h, w) image by `min(long_max / max(h, w), short / min(h, w))`
and ROUNDS each side (`int(side * factor + 0.5)`); torchvision's `RandomShortestSize` and
`ScaleJitter` truncate (`int(side * factor)`): a 640 x 480 photo at shorter side 800 came out
1066 wide, not 1067, and a 640 x 335 one 799 high (335 * (800 / 335) = 799.99...). The transforms
here draw their random choices exactly as those torchvision transforms do (one `torch.randint`
for the scale, one `torch.rand` for the jitter ratio) and differ only in the size rule, so a run
whose sizes were exact (the default pipeline's 128 px squares at 128) is unchanged. Resampling:
torchvision's bilinear with antialias (mmcv's cv2 does not antialias a downscale).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size


def keep_ratio_size(height: int, width: int, short: float, long_max: float = math.inf
                    ) -> tuple[int, int]:
    """mmcv's `rescale_size`: the (h, w) that fits `short` x `long_max` keeping the ratio (rounded;
    TAO's DINO resize truncates: 480 x 640 at 800 is 800 x 1067 here, 800 x 1066 there).

    Args:
        height, width: the image's size, pixels.
        short: target of the shorter side.
        long_max: cap of the longer side (inf: none).

    Returns:
        `(int(height * f + 0.5), int(width * f + 0.5))` with
        `f = min(long_max / max(height, width), short / min(height, width))`.
    """
    factor = min(long_max / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class _SizedResize(v2.Transform):
    """A resize to the `size` (h, w) its subclass's `make_params` picks (antialiased bilinear)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class KeepRatioResize(_SizedResize):
    """Shorter side to a random one of `short_sides`, longer side at most `max_size` (mmdet's
    `RandomChoiceResize(keep_ratio=True)` with scales `(max_size, s)`; one side: `Resize`).

    The choice is drawn as `v2.RandomShortestSize` draws it; the size is `keep_ratio_size`'s.
    """

    def __init__(self, short_sides: Sequence[int], max_size: Optional[int] = None) -> None:
        super().__init__()
        self.short_sides = list(short_sides)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        short = self.short_sides[int(torch.randint(len(self.short_sides), ()))]
        long_max = math.inf if self.max_size is None else self.max_size
        return {"size": keep_ratio_size(height, width, short, long_max)}


class LargeScaleJitter(_SizedResize):
    """LSJ's resize: a `size` x `size` target scaled by a random ratio in `ratio_range`, the image
    fitted into it keeping its ratio (mmdet's `RandomResize(scale=(size, size), ratio_range,
    keep_ratio=True)`: target side `int(size * ratio)`, then `keep_ratio_size`).

    The ratio is drawn as `v2.ScaleJitter` draws it.
    """

    def __init__(self, size: int, ratio_range: tuple[float, float]) -> None:
        super().__init__()
        self.size = size
        self.ratio_range = ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        low, high = self.ratio_range
        ratio = float(low + torch.rand(1) * (high - low))
        target = int(self.size * ratio)
        return {"size": keep_ratio_size(height, width, target, target)}
