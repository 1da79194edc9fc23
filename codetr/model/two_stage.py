"""Two-stage query selection: every encoder location proposes a box, the top-k seed the decoder.

DINO's "standard" two-stage: a fixed-size proposal per location (`gen_encoder_output_proposals`),
an extra class/box branch scores and refines them, and the `num_queries` best become the
decoder's initial reference boxes (detached: "mixed query selection").

How the proposals are classified (`PROPOSAL_CLASSES`, spec `model.encoder_proposal_classes`):
- `per_class` (DINO, Co-DINO): ranked by their highest class logit; the intermediate loss
  supervises the selected top-k with the ground truth's classes.
- `class_agnostic` (Deformable DETR, Co-Deformable-DETR): ranked by the logit of class 0; the
  intermediate loss supervises EVERY location, matched against the ground truth with all labels
  0 ("object"), as mmdet's `DeformableDETRHead` (`binary_labels_list`) and Sense-X's
  `CoDeformDETRHead` train them.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from codetr.model.geometry_memo import GeometryMemo

# Proposals touching the border (any cxcywh value outside this open range) are invalid.
_VALID_MIN, _VALID_MAX = 0.01, 0.99
PROPOSAL_CLASSES = ("per_class", "class_agnostic")
# Indices `[B, K]` that replace the top-k selection while set (see `forced_selection`).
_PROPOSALS = GeometryMemo()  # (proposals_unsig, invalid) of unpadded batches, eager CPU inference
_FORCED: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("codetr_forced_topk", default=None)


@contextlib.contextmanager
def forced_selection(indices: Tensor) -> Iterator[None]:
    """Makes `select_topk_proposals` keep `indices` `[B, K]` (sorted by rank) instead of its top-k.

    For comparing two runtimes on the same selection (`codetr.export.parity`): proposals whose
    scores tie within float noise may be ranked in either order, and each rank is paired with
    its own learned content query, so a swap changes the outputs by more than the noise.
    """
    token = _FORCED.set(indices)
    try:
        yield
    finally:
        _FORCED.reset(token)


def encoder_proposals(memory: Tensor, memory_mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """One proposal per memory location and the memory with invalid locations zeroed.

    A location `(x, y)` of level `l` proposes cx = (x + 0.5) / w_valid, cy = (y + 0.5) / h_valid,
    w = h = 0.05 * 2**l. Padded locations and proposals not strictly inside (0.01, 0.99) are
    invalid: their logits are +inf (so they sigmoid to 1) and their memory is zero.

    Args:
        memory: `[B, S, D]` encoder output.
        memory_mask: `[B, S]` bool, True on padding.
        spatial_shapes: `[L, 2]` int64 `(h, w)`.

    Returns:
        `(output_memory [B, S, D], proposals_unsig [B, S, 4])`, proposals as inverse-sigmoid
        cxcywh normalised by the unpadded size.
    """
    proposals_unsig, invalid = _PROPOSALS.cached(  # eager CPU inference without padding: memoised
        memory_mask,
        lambda: (tuple(memory_mask.shape), tuple(map(tuple, spatial_shapes.tolist())), memory.dtype),
        lambda: proposal_geometry(memory_mask, spatial_shapes, memory.dtype))
    return memory.masked_fill(invalid, 0.0), proposals_unsig


def proposal_geometry(memory_mask: Tensor, spatial_shapes: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The proposals of `encoder_proposals` and where they are invalid (a function of the mask).

    Returns:
        `(proposals_unsig [B, S, 4] dtype, invalid [B, S, 1] bool)`.
    """
    batch = memory_mask.shape[0]
    device = memory_mask.device
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        mask = memory_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~mask[:, :, 0]).sum(1).to(dtype)
        valid_w = (~mask[:, 0, :]).sum(1).to(dtype)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=dtype, device=device),
            torch.arange(w, dtype=dtype, device=device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)[None] + 0.5  # [1, h, w, 2]
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        centre = grid / scale
        size = torch.full_like(centre, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat([centre, size], -1).view(batch, h * w, 4))
        start += h * w
    proposals_t = torch.cat(proposals, 1)
    valid = ((proposals_t > _VALID_MIN) & (proposals_t < _VALID_MAX)).all(-1) & ~memory_mask  # [B, S]
    # Clamp before the logit so invalid (padded) locations never produce NaN, then overwrite.
    clamped = proposals_t.clamp(_VALID_MIN, _VALID_MAX)
    invalid = ~valid[..., None]
    return torch.log(clamped / (1 - clamped)).masked_fill(invalid, float("inf")), invalid


@dataclass
class TopKProposals:
    """The selected encoder proposals (all `[B, K, ...]`, K = number of selected queries).

    Attributes:
        logits: `[B, K, C]` class logits of the encoder branch (for the intermediate loss).
        boxes_unsig: `[B, K, 4]` refined cxcywh boxes in inverse-sigmoid space, NOT detached (the
            intermediate loss trains the encoder box branch through them).
        content: `[B, K, D]` transformed memory at the selected locations, NOT detached.
        query_pos: `[B, K, D]` Deformable-DETR positional queries of the (detached) boxes, set by
            the transformer when its decoder takes them from the proposals, else None.
        all_logits: `[B, S, C]` logits of every location (`class_agnostic`: what the
            intermediate loss supervises), else None.
        all_boxes_unsig: `[B, S, 4]` refined boxes of every location, as `all_logits`.
    """

    logits: Tensor
    boxes_unsig: Tensor
    content: Tensor
    query_pos: Optional[Tensor] = None
    all_logits: Optional[Tensor] = None
    all_boxes_unsig: Optional[Tensor] = None

    def loss_outputs(self) -> dict[str, Tensor]:
        """What the intermediate loss supervises: `{pred_logits [B, N, C], pred_boxes [B, N, 4]
        cxcywh normalised}`, N = S (every location, `class_agnostic`) or K (the top-k).

        Invalid locations (`+inf` proposals) have boxes of 1.0 and no box gradient, as in mmdet.
        """
        if self.all_logits is not None and self.all_boxes_unsig is not None:
            return {"pred_logits": self.all_logits, "pred_boxes": self.all_boxes_unsig.sigmoid()}
        return {"pred_logits": self.logits, "pred_boxes": self.boxes_unsig.sigmoid()}


def proposal_scores(logits: Tensor, proposal_classes: str) -> Tensor:
    """`[B, S]` ranking scores of `[B, S, C]` proposal logits: class 0's logit (`class_agnostic`)
    or the highest class logit (`per_class`)."""
    if proposal_classes not in PROPOSAL_CLASSES:
        raise ValueError(f"proposal_classes must be one of {PROPOSAL_CLASSES}, got {proposal_classes!r}")
    return logits[..., 0] if proposal_classes == "class_agnostic" else logits.max(-1)[0]


def select_topk_proposals(
    output_memory: Tensor,
    proposals_unsig: Tensor,
    cls_branch: nn.Module,
    reg_branch: nn.Module,
    num_queries: int,
    proposal_classes: str = "per_class",
) -> TopKProposals:
    """Scores every proposal and keeps the `num_queries` best.

    Args:
        output_memory: `[B, S, D]` `enc_output_norm(enc_output(memory))`.
        proposals_unsig: `[B, S, 4]` inverse-sigmoid proposals.
        cls_branch: `[..., D] -> [..., C]` encoder class branch.
        reg_branch: `[..., D] -> [..., 4]` encoder box branch (delta in inverse-sigmoid space).
        num_queries: K; capped at S so tiny inputs still run (the decoder then has S queries).
        proposal_classes: `per_class` (rank by the highest class logit) or `class_agnostic`
            (rank by the logit of class 0, keep every location's outputs for the loss).

    Returns:
        The top-k proposals (ties of equal scores in `torch.topk`'s order).
    """
    agnostic = proposal_classes == "class_agnostic"
    k = min(num_queries, output_memory.shape[1])
    logits = cls_branch(output_memory)  # [B, S, C]
    boxes_unsig = reg_branch(output_memory) + proposals_unsig  # [B, S, 4]
    scores = proposal_scores(logits, proposal_classes)  # [B, S]
    forced = _FORCED.get()
    if forced is None:
        topk = torch.topk(scores, k, dim=1)[1]  # [B, K]
    else:
        topk = forced.to(logits.device)

    def gather(x: Tensor) -> Tensor:
        return torch.gather(x, 1, topk[..., None].expand(-1, -1, x.shape[-1]))

    return TopKProposals(logits=gather(logits), boxes_unsig=gather(boxes_unsig), content=gather(output_memory),
                         all_logits=logits if agnostic else None,
                         all_boxes_unsig=boxes_unsig if agnostic else None)
