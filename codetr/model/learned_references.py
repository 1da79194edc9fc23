"""DINO's learned reference boxes, the matching queries' anchors of `two_stage_type="no"`.

State-dict names (under `query_head.transformer.`, DINO's): `refpoint_embed.weight` `[Q, 4]`
(`fix_refpoints_hw = -1`) or `[Q, 2]` (centres only), plus `hw_embed.weight` `[1, 2]` (one shared
(w, h), `fix_refpoints_hw = -2`). All in inverse-sigmoid cxcywh.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from codetr.boxes import inverse_sigmoid


def reference_embeddings(num_queries: int, fix_refpoints_hw: float
                         ) -> tuple[nn.Embedding, Optional[nn.Embedding]]:
    """`(refpoint_embed, hw_embed)` of DINO's `init_ref_points`.

    `fix_refpoints_hw`: -1 learns (cx, cy, w, h) per query; -2 learns (cx, cy) per query and one
    (w, h) shared by all; a value > 0 fixes w = h to it (cx, cy learned).
    """
    if fix_refpoints_hw == -1:
        return nn.Embedding(num_queries, 4), None
    if fix_refpoints_hw == -2:
        return nn.Embedding(num_queries, 2), nn.Embedding(1, 2)
    if fix_refpoints_hw > 0:
        return nn.Embedding(num_queries, 2), None
    raise ValueError(f"fix_refpoints_hw must be -1, -2 or > 0, got {fix_refpoints_hw}")


def init_reference_embeddings(refpoint_embed: nn.Embedding, hw_embed: Optional[nn.Embedding]) -> None:
    """DINO's init: N(0, 1), and centres-only embeddings uniform over the image
    (`random_refpoints_xy`)."""
    nn.init.normal_(refpoint_embed.weight)
    if refpoint_embed.weight.shape[1] == 2:
        with torch.no_grad():
            refpoint_embed.weight.copy_(inverse_sigmoid(torch.rand_like(refpoint_embed.weight)))
    if hw_embed is not None:
        nn.init.normal_(hw_embed.weight)


def learned_references(refpoint_embed: nn.Embedding, hw_embed: Optional[nn.Embedding],
                       fix_refpoints_hw: float) -> Tensor:
    """`[Q, 4]` inverse-sigmoid cxcywh reference boxes; a fixed (w, h) goes through the clamped
    inverse sigmoid as DINO's, so values >= 1 mean whole-image boxes."""
    centres = refpoint_embed.weight
    if hw_embed is not None:
        return torch.cat([centres, hw_embed.weight.expand(centres.shape[0], -1)], -1)
    if centres.shape[1] == 2:
        fixed = torch.full_like(centres, float(fix_refpoints_hw))
        return torch.cat([centres, inverse_sigmoid(fixed)], -1)
    return centres
