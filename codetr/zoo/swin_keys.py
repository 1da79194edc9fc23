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
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch
from torch import Tensor

ORDER = (0, 2, 1, 3)  # mmdet unfold position p = kh*2 + kw -> original concat block k
_MARKERS = ("backbone.patch_embed.proj.", "backbone.layers.0.blocks.0.attn.qkv.")
_RENAMES = (
    (re.compile(r"^backbone\.patch_embed\.proj\."), "backbone.patch_embed.projection."),
    (re.compile(r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.(?!w_msa\.)"),
     r"backbone.stages.\1.blocks.\2.attn.w_msa."),
    (re.compile(r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\."),
     r"backbone.stages.\1.blocks.\2.ffn.layers.0.0."),
    (re.compile(r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\."),
     r"backbone.stages.\1.blocks.\2.ffn.layers.1."),
    (re.compile(r"^backbone\.layers\.(\d+)\."), r"backbone.stages.\1."),
)
_MERGE = re.compile(r"^backbone\.stages\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")


def has_original_swin_names(keys) -> bool:
    """True for a state dict whose backbone is an original-name Swin (Sense-X release)."""
    keys = set(keys)
    return all(any(k.startswith(m) for k in keys) for m in _MARKERS)


def unfold_order(tensor: Tensor) -> Tensor:
    """Re-orders the 4C merged channels of a patch-merging tensor from concat to unfold order.

    Args:
        tensor: `reduction.weight` `[2C, 4C]` (columns re-ordered) or `norm.*` `[4C]`.
    """
    channels = tensor.shape[-1] // 4
    blocks = tensor.reshape(*tensor.shape[:-1], 4, channels)  # [..., k, c]: original k*C + c
    ordered = blocks[..., list(ORDER), :]  # [..., p, c]
    return ordered.transpose(-1, -2).reshape(tensor.shape)  # [..., c, p] -> c*4 + p


def original_swin_to_mmdet(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Renames an original-name Swin backbone to mmdet's names and re-orders the merge channels.

    Keys outside `backbone.` and non-Swin keys pass unchanged; the order of the keys is kept.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        name = key
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name, count=1)
        if _MERGE.match(name) and isinstance(value, torch.Tensor):
            value = unfold_order(value)
        out[name] = value
    return out
