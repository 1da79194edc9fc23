"""One decoder pass for the matching (+ denoising) queries and every co-head's positive queries.

Co-DETR decodes each collaborative head's customized positive queries in a decoder pass of its
own (mmdet's `forward_aux`), beside the main pass. Every decoder operation is per query except
self-attention, so the passes can share one call: the query groups are concatenated along the
query axis and a block-diagonal self-attention mask keeps each group attending only to itself
(inside the main group, the denoising mask as before). Each query then sees exactly the keys it
saw in its own pass; masked keys get weight exp(-inf) = 0, so the results agree up to the order
of floating-point sums. On the CPU the step saves one decoder's worth of per-op overhead (the
positive groups are small: 9 to 300 queries per image).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def block_attn_mask(sizes: Sequence[int], first_mask: Optional[Tensor], device: torch.device
                    ) -> Tensor:
    """Self-attention mask of concatenated query groups: a query sees only its own group.

    Args:
        sizes: queries per group, main group first.
        first_mask: `[sizes[0], sizes[0]]` bool mask inside the main group (True = blocked;
            the denoising mask), or None (all visible).
        device: where to build it.

    Returns:
        `[N, N]` bool, N = sum(sizes), True = blocked.
    """
    blocks = [torch.ones(n, n, dtype=torch.bool, device=device) for n in sizes]
    if first_mask is not None:
        blocks[0] = ~first_mask.to(device=device, dtype=torch.bool)
    return ~torch.block_diag(*blocks)


def concat_groups(tensors: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    """`[B, N_g, ...]` per group -> `[B, sum N_g, ...]`; None when every group has None.

    Raises:
        ValueError: when some groups have a tensor and others None (e.g. fixed positional
            queries for one group only).
    """
    present = [t is not None for t in tensors]
    if not any(present):
        return None
    if not all(present):
        raise ValueError("query groups disagree: some carry fixed positional queries, some not")
    return torch.cat(list(tensors), dim=1)


def split_groups(values: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """`[B, sum N_g, ...]` -> per group `[B, N_g, ...]` (views)."""
    return list(values.split(list(sizes), dim=1))
