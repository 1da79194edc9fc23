"""The name map from official Co-DINO checkpoints (mmdet 3.x, Sense-X / mmdet 2.x) to codetr.

mmdet -> codetr (../shared/reference/mmdet-codino/README.md, "Name map"):

- `backbone.X` -> `backbone.body.X`: mmdet's ResNet uses torchvision's names (conv1, bn1,
  layerN.i.convK/bnK, downsample.0/1), as timm does; the mmdet-compatible Swin
  (`codetr/model/swin.py`) keeps mmdet's Swin names, so the same prefix rule covers it.
- `query_head.dn_generator.label_embedding.weight` (mmdet 3.x) and
  `query_head.label_embedding.weight` (Sense-X) -> `query_head.label_embedding.weight`.
- `query_head.transformer.aux_pos_trans{,_norm}.k` (and `pos_feats_{trans,norm}.k` of
  `with_coord_feat`): mmdet numbers the co-heads with the Faster R-CNN head FIRST (index 0) and
  the ATSS heads after it. When the target model has the R-CNN co-head (`rpn_head.*` keys, spec
  `model.use_rcnn_co_head: true`), they map 1:1; otherwise index k goes to k-1 and index 0,
  `rpn_head.*` and `roi_head.*` are dropped on purpose. A by-name load would put the R-CNN
  projection into our ATSS slot 0, with the right shape. `head_pos_embed.weight` holds one row
  per co-head in the same order: without the R-CNN co-head its row 0 is cut (`map_value`).
- Everything else (`neck.*`, `query_head.*`, `bbox_head.k.*`) has the same name.
- A Sense-X Swin with the original Swin names is converted to mmdet's names first
  (`swin_keys.original_swin_to_mmdet`, called by `importer.import_official`).

Dropped on purpose, with the reason the report prints: the R-CNN co-head when the model has none,
EMA shadow copies (`ema_*` keys of mmcv's EMAHook; the model weights are used). Non-tensor entries (torch's `_metadata`
attribute, stray keys) never reach the map. Constant buffers the target does not keep
(`CONSTANT_BUFFERS`: BatchNorm counters, Swin's relative position index) are dropped too.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Tuple

from torch import Tensor

NO_RCNN_REASON = "no Faster R-CNN co-head in this spec (model.use_rcnn_co_head: false)"
EMA_REASON = "EMA shadow copy (mmcv EMAHook buffer); the model weights are loaded"
COUNTER_REASON = "BatchNorm step counter the model does not keep"
INDEX_REASON = "Swin relative_position_index: a constant the model computes itself"
# Buffers an official file carries that hold no learned value: dropped when the model lacks them.
CONSTANT_BUFFERS = {"num_batches_tracked": COUNTER_REASON, "relative_position_index": INDEX_REASON}

_AUX_POS = re.compile(r"^(query_head\.transformer\.(?:aux_pos_trans(?:_norm)?|pos_feats_(?:trans|norm)))"
                      r"\.(\d+)\.(.+)$")
HEAD_POS_EMBED = "query_head.transformer.head_pos_embed.weight"
_LABEL_EMBEDDINGS = ("query_head.dn_generator.label_embedding.", "query_head.label_embedding.")
_RCNN_PREFIXES = ("rpn_head.", "roi_head.")
# A key only mmdet 3.x's Co-DINO has (ours put the trunk under `backbone.body.`; our R-CNN
# co-head uses mmdet's `rpn_head.` / `roi_head.` names, so those prove nothing).
_OFFICIAL_MARKER = "query_head.dn_generator."


def has_rcnn_co_head(target_keys: Iterable[str]) -> bool:
    """Whether the target model has the Faster R-CNN co-head (decided from its state-dict keys)."""
    return any(k.startswith(_RCNN_PREFIXES) for k in target_keys)


def is_official_state_dict(keys: Iterable[str]) -> bool:
    """True for the weights of an official Co-DETR checkpoint (mmdet 3.x or Sense-X), by key pattern.

    An official state dict has a Co-DETR query head (`query_head.transformer.*`) and a backbone
    whose keys sit directly under `backbone.` (ours are under `backbone.body.`), or mmdet 3.x's
    denoising generator (`query_head.dn_generator.*`).
    """
    keys = list(keys)
    if not any(k.startswith("query_head.transformer.") for k in keys):
        return False
    backbone = [k for k in keys if k.startswith("backbone.")]
    mmdet_trunk = bool(backbone) and not any(k.startswith("backbone.body.") for k in backbone)
    return mmdet_trunk or any(k.startswith(_OFFICIAL_MARKER) for k in keys)


def map_key(key: str, with_rcnn: bool) -> Tuple[Optional[str], str]:
    """One official key -> (codetr key, '') or (None, the reason it is dropped on purpose).

    Args:
        key: an mmdet / Sense-X state-dict key.
        with_rcnn: the target model has the Faster R-CNN co-head (`has_rcnn_co_head`).
    """
    if key.startswith("ema_"):
        return None, EMA_REASON
    if key.startswith(_RCNN_PREFIXES):
        return (key, "") if with_rcnn else (None, NO_RCNN_REASON)
    if key.startswith("backbone.") and not key.startswith("backbone.body."):
        return "backbone.body." + key[len("backbone."):], ""
    for prefix in _LABEL_EMBEDDINGS:
        if key.startswith(prefix):
            return "query_head.label_embedding." + key[len(prefix):], ""
    match = _AUX_POS.match(key)
    if match and not with_rcnn:
        name, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if index == 0:
            return None, NO_RCNN_REASON
        return f"{name}.{index - 1}.{rest}", ""
    return key, ""


def map_value(name: str, tensor: Tensor, with_rcnn: bool) -> Tensor:
    """The value of an official tensor under its codetr name: `head_pos_embed.weight`'s rows
    follow mmdet's co-head order (R-CNN first), so without the R-CNN co-head row 0 goes."""
    if name == HEAD_POS_EMBED and not with_rcnn:
        return tensor[1:]
    return tensor
