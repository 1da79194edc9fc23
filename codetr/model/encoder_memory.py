"""What the encoder hands to query selection, the decoder and the co-heads: the flattened
memory and the geometry needed to read it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EncoderMemory:
    """The encoder output and the geometry needed to read it.

    Attributes:
        memory: `[B, S, D]` flattened levels (row-major per level, level after level).
        memory_mask: `[B, S]` bool, True on padding.
        spatial_shapes: `[L, 2]` int64 `(h, w)` per level.
        level_start_index: `[L]` int64 offset of each level in `S`.
        valid_ratios: `[B, L, 2]` `(w_valid / w, h_valid / h)` per level.
    """

    memory: Tensor
    memory_mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor

    def level_maps(self) -> list[Tensor]:
        """The memory as L maps `[B, D, H_l, W_l]` (views of `memory`, not detached)."""
        batch, _, dim = self.memory.shape
        shapes = self.spatial_shapes.tolist()
        return [level.transpose(1, 2).reshape(batch, dim, h, w)
                for level, (h, w) in zip(self.memory.split([h * w for h, w in shapes], 1), shapes)]


def valid_ratios_of(mask: Tensor) -> Tensor:
    """`[B, H, W]` padding mask (True = pad) -> `[B, 2]` `(w_valid / W, h_valid / H)`."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)
