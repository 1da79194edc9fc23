"""Original Swin names (Sense-X `SwinTransformerV1`, microsoft/Swin-Transformer) -> mmdet's Swin.

The Sense-X Co-DETR release builds Swin-L with `SwinTransformerV1`, which keeps the original Swin
names; mmdet 3.x's `SwinTransformer` (and codetr's port, `codetr/model/swin.py`) uses others:

| original (under `backbone.`)            | mmdet                                    |
| --- | --- |
| `patch_embed.proj`                      | `patch_embed.projection`                 |
| `layers.i.blocks.j.attn.{qkv, proj, relative_position_bias_table, relative_position_index}` | `stages.i.blocks.j.attn.w_msa.*` |
| `layers.i.blocks.j.mlp.fc1` / `fc2`     | `stages.i.blocks.j.ffn.layers.0.0` / `ffn.layers.1` |
| `layers.i.blocks.j.norm1` / `norm2`     | `stages.i.blocks.j.norm1` / `norm2`      |
| `layers.i.downsample.{reduction, norm}` | `stages.i.downsample.*`, channels re-ordered |
| `norm{i}`, `patch_embed.norm`           | the same                                 |

Patch merging: the original concatenates the 2x2 neighbours as x[0::2, 0::2], x[1::2, 0::2],
x[0::2, 1::2], x[1::2, 1::2] (input channel k*C + c, k = kw*2 + kh); mmdet's `nn.Unfold` puts
channel c of offset (kh, kw) at c*4 + kh*2 + kw. So mmdet's channel c*4 + p is the original's
ORDER[p]*C + c, for `reduction.weight`'s columns and the `norm` vectors alike.

The renaming and the channel order are those of `codetr.model.swin_weights` (one converter for
backbone files and official checkpoints alike); this module applies it under `backbone.` of a
whole-model state dict.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch
from torch import Tensor

from codetr.model.swin_weights import concat_to_unfold_norm, concat_to_unfold_reduction, rename_key, \
    reorder_merge

PREFIX = "backbone."
_MARKERS = ("backbone.patch_embed.proj.", "backbone.layers.0.blocks.0.attn.qkv.")
_STAGE = re.compile(r"^layers\.(\d+)\.")


def has_original_swin_names(keys) -> bool:
    """True for a state dict whose backbone is an original-name Swin (Sense-X release)."""
    keys = set(keys)
    return all(any(k.startswith(m) for k in keys) for m in _MARKERS)


def unfold_order(tensor: Tensor) -> Tensor:
    """Re-orders the 4C merged channels of a patch-merging tensor from concat to unfold order.

    Args:
        tensor: `reduction.weight` `[2C, 4C]` (columns re-ordered) or `norm.*` `[4C]`.
    """
    return concat_to_unfold_reduction(tensor) if tensor.dim() == 2 else concat_to_unfold_norm(tensor)


def original_swin_to_mmdet(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Renames an original-name Swin backbone to mmdet's names and re-orders the merge channels.

    Keys outside `backbone.` pass unchanged; the order of the keys is kept. The shift masks
    (`attn_mask`, derived buffers) keep their place under the stage's mmdet name, so the import
    report lists them as dropped.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            out[key] = value
            continue
        rest = key[len(PREFIX):]
        renamed = rename_key(rest, timm_layout=False)
        name, kind = renamed if renamed is not None else (_STAGE.sub(r"stages.\1.", rest), "")
        if isinstance(value, torch.Tensor):
            value = reorder_merge(value, kind)
        out[PREFIX + name] = value
    return out
