"""Sine positional encodings: of feature-map pixels (encoder) and of reference boxes (decoder).

Both follow DINO (IDEA-Research/DINO ``PositionEmbeddingSineHW`` and
``gen_sineembed_for_position``): every coordinate c in [0, 2*pi] becomes ``num_pos_feats`` values
``[sin(c / t_0), cos(c / t_0), sin(c / t_1), cos(c / t_1), ...]`` with
``t_i = temperature ** (2 * i / num_pos_feats)``, and the per-axis blocks are concatenated y first.
"""
import math

import torch
from torch import Tensor, nn

from codetr.model.geometry_memo import GeometryMemo

_ENCODINGS = GeometryMemo()  # pixel encodings of unpadded masks, eager CPU inference


def _sine_features(coords: Tensor, num_pos_feats: int, temperature: float) -> Tensor:
    """Interleaved sin/cos features of already scaled coordinates.

    Args:
        coords: ``[...]`` float coordinates (already multiplied by the scale).
        num_pos_feats: even number of output features per coordinate.
        temperature: frequency base.

    Returns:
        ``[..., num_pos_feats]``: ``sin(c / t_0), cos(c / t_0), sin(c / t_1), cos(c / t_1), ...``.
    """
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
    # t_i for the even i only: pairs (sin, cos) share a frequency (DINO's 2 * (i // 2) exponent),
    # so each phase is computed once; stacking then flattening interleaves sin and cos.
    exponent = torch.arange(0, num_pos_feats, 2, dtype=torch.float32, device=coords.device) / num_pos_feats
    pos = coords.float()[..., None] / temperature ** exponent
    return torch.stack((pos.sin(), pos.cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine encoding of pixel positions with separate temperatures for y and x (DINO's HW form).

    Positions are counted over NON-padding pixels only (cumulative sum of the valid mask), so the
    encoding of a padded image matches the encoding of the same image unpadded.

    Args:
        num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels.
        temperature_h: frequency base of the y block (TAO's ``pe_temperatureH``, 20 in Co-DINO).
        temperature_w: frequency base of the x block (``pe_temperatureW``).
        normalize: divide the running position by the row/column length of valid pixels, so
            positions lie in (0, scale].
        scale: multiplier after normalisation (2*pi).
        offset: added to the 1-based running position before normalisation (``model.pe_offset``:
            0 in DINO / Co-DINO, -0.5 in mmdet's Deformable DETR / Co-Deformable-DETR, which
            puts each pixel at its centre).
    """

    def __init__(self, num_pos_feats: int, temperature_h: int, temperature_w: int,
                 normalize: bool = True, scale: float = 2 * math.pi, offset: float = 0.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """Encode the positions of a padding mask.

        Args:
            mask: bool ``[B, H, W]``, True on padding.

        Returns:
            float32 ``[B, 2 * num_pos_feats, H, W]``: y block (channels ``[0, num_pos_feats)``)
            then x block; channels innermost in memory (a permuted view).
        """
        return _ENCODINGS.cached(  # eager CPU inference without padding: memoised
            mask, lambda: (tuple(mask.shape), self.num_pos_feats, self.temperature_h,
                           self.temperature_w, self.normalize, self.scale, self.offset),
            lambda: self._encode(mask))

    def _encode(self, mask: Tensor) -> Tensor:
        """`forward` without the memo."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W], 1-based row of valid pixels
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6  # keeps all-padding columns finite (their positions become 0)
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        pos_y = _sine_features(y_embed, self.num_pos_feats, self.temperature_h)  # [B, H, W, F]
        pos_x = _sine_features(x_embed, self.num_pos_feats, self.temperature_w)
        # [B, H, W, 2F] permuted, not copied: the transformer flattens it back to [B, H*W, 2F].
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed_boxes(boxes: Tensor, num_pos_feats: int = 128, temperature: int = 10000) -> Tensor:
    """Sine embedding of normalised reference points or boxes (the decoder's query position).

    Follows DINO's ``gen_sineembed_for_position``: each coordinate is scaled by 2*pi and encoded
    with ``num_pos_feats`` features, and the blocks come in the order **(y, x)** for points and
    **(y, x, w, h)** for boxes (note: y before x, but w before h, as DINO does).

    Args:
        boxes: ``[..., 2]`` points ``(cx, cy)`` or ``[..., 4]`` boxes ``(cx, cy, w, h)``, all
            normalised to [0, 1].
        num_pos_feats: features per coordinate.
        temperature: frequency base.

    Returns:
        ``[..., 2 * num_pos_feats]`` or ``[..., 4 * num_pos_feats]`` float32.
    """
    size = boxes.shape[-1]
    if size not in (2, 4):
        raise ValueError(f"boxes must end with 2 or 4 coordinates, got shape {tuple(boxes.shape)}")
    order = [1, 0] if size == 2 else [1, 0, 2, 3]
    # All coordinates in one call: [..., size] -> [..., size, F] -> [..., size * F].
    return _sine_features(boxes[..., order] * (2 * math.pi), num_pos_feats, temperature).flatten(-2)
