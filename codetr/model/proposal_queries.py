"""Deformable DETR's queries from boxes: ``LayerNorm(Linear(sine(box)))`` split in two halves.

In Deformable DETR's two-stage mode (and Co-Deformable-DETR) the selected encoder proposals give
the decoder's positional queries, fixed for every layer, through ``pos_trans`` (Linear 2D -> 2D)
and ``pos_trans_norm`` (LayerNorm 2D): the first D features are the positional query, the second
D the content query (used unless the content comes from learned embeddings: "mixed selection",
TAO's ``embed_init_tgt``). Co-Deformable-DETR's customized positive queries use the same form
with one ``aux_pos_trans`` / ``aux_pos_trans_norm`` pair per co-head.
"""
from __future__ import annotations

from torch import Tensor, nn

from codetr.model.position_encoding import sine_embed_boxes


def xywh_sine_embed(boxes: Tensor, num_pos_feats: int) -> Tensor:
    """Sine embedding with blocks in the order (cx, cy, w, h), as mmdet's ``get_proposal_pos_embed``.

    Args:
        boxes: ``[..., 4]`` cxcywh in [0, 1].
        num_pos_feats: features per coordinate (D / 2).

    Returns:
        ``[..., 4 * num_pos_feats]`` float32 (temperature 10000, scale 2 pi).
    """
    embed = sine_embed_boxes(boxes, num_pos_feats)  # blocks (y, x, w, h)
    f = num_pos_feats
    return embed[..., [*range(f, 2 * f), *range(f), *range(2 * f, 4 * f)]]


def box_queries(boxes: Tensor, linear: nn.Linear, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """Positional and content queries of boxes.

    Args:
        boxes: ``[B, N, 4]`` cxcywh in [0, 1] (detach them first where no gradient may flow).
        linear: ``Linear(2D, 2D)`` (``pos_trans`` or ``aux_pos_trans[k]``).
        norm: ``LayerNorm(2D)``.

    Returns:
        ``(query_pos [B, N, D], content [B, N, D])``.
    """
    dim = linear.out_features // 2
    out = norm(linear(xywh_sine_embed(boxes, dim // 2).to(linear.weight.dtype)))
    return out[..., :dim], out[..., dim:]
