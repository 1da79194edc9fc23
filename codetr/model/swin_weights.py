"""Swin checkpoints of other layouts -> the mmdet names of ``codetr.model.swin.SwinTransformer``.

Three layouts exist for the same network:

- **mmdet** (``stages.i.*``, ``patch_embed.projection``; Co-DINO / mmdet checkpoints): kept.
- **original** (microsoft/Swin-Transformer releases, e.g.
  ``swin_large_patch4_window12_384_22k.pth``, the file Co-DINO's Swin-L config starts from):
  ``layers.i.*`` with the patch merging at the END of stage i (``layers.0.downsample``
  exists), ``attn.*``, ``mlp.fc1/fc2``, ``patch_embed.proj``.
  This is what mmdet's ``swin_converter`` (``convert_weights=True``) converts, and the mapping
  here is the same.
- **timm** (timm >= 0.9, and codetr checkpoints from before this module: ``layers_i``): as
  original, but the patch merging sits at the START of stage i+1 (``layers.1.downsample`` is
  stage 0's) and ``relative_position_index`` / ``attn_mask`` are not stored.

Original and timm patch merging concatenate the 2x2 neighbours as x[0::2, 0::2], x[1::2, 0::2],
x[0::2, 1::2], x[1::2, 1::2] (channel ``4-block k * C + c``); mmdet uses ``nn.Unfold``
(channel ``4c + 2kh + kw``), so ``downsample.reduction.weight`` columns and ``downsample.norm.*``
are permuted (mmdet's ``correct_unfold_reduction_order`` / ``correct_unfold_norm_order``).

In every layout, a ``relative_position_bias_table`` of another window size is resized bicubically
as mmdet does on load, and a ``relative_position_index`` of another window (a derived buffer) is
replaced by the module's own (timm checkpoints, which store none, get the module's own). The
per-level ``norm0..3`` exist only in mmdet checkpoints: from the other layouts they stay at
their init and are reported missing, as when mmdet's Co-DINO starts from the original release.
"""
import math
import re

import torch.nn.functional as F
from torch import Tensor

from codetr.model.pretrained import STRIP_PREFIXES

_LAYER = re.compile(r"^layers[._](\d+)\.(.*)$")
_CONCAT_TO_UNFOLD = [0, 2, 1, 3]  # concat block at each Unfold offset kh * 2 + kw


def _split_prefix(key: str) -> tuple[str, str]:
    """``"module.backbone.layers.0..."`` -> ``("module.backbone.", "layers.0...")``."""
    rest = key
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if rest.startswith(prefix):
                rest, stripped = rest[len(prefix):], True
                break
    return key[: len(key) - len(rest)], rest


def concat_to_unfold_reduction(weight: Tensor) -> Tensor:
    """``[C_out, 4C]`` reduction weight: concat channel order -> ``nn.Unfold`` order."""
    c_out, c4 = weight.shape
    blocks = weight.reshape(c_out, 4, c4 // 4)[:, _CONCAT_TO_UNFOLD]  # [C_out, offset, C]
    return blocks.transpose(1, 2).reshape(c_out, c4)


def concat_to_unfold_norm(vector: Tensor) -> Tensor:
    """``[4C]`` patch-merging LayerNorm weight or bias: concat order -> ``nn.Unfold`` order."""
    return vector.reshape(4, -1)[_CONCAT_TO_UNFOLD].transpose(0, 1).reshape(-1)


def reorder_merge(tensor: Tensor, kind: str) -> Tensor:
    """Applies the reordering `rename_key` asked for (``"reduction"``, ``"norm"`` or ``""``)."""
    if kind == "reduction":
        return concat_to_unfold_reduction(tensor)
    if kind == "norm":
        return concat_to_unfold_norm(tensor)
    return tensor


def swin_layout(keys: list[str]) -> str:
    """``"mmdet"``, ``"original"``, ``"timm"`` or ``"unknown"`` from prefix-stripped key names."""
    if any(k.startswith(("stages.", "patch_embed.projection.")) for k in keys):
        return "mmdet"
    layers = [m for m in map(_LAYER.match, keys) if m]
    if not layers:
        return "unknown"
    merges = {int(m.group(1)) for m in layers if m.group(2).startswith("downsample.")}
    return "timm" if merges and 0 not in merges else "original"


def rename_key(rest: str, timm_layout: bool) -> tuple[str, str] | None:
    """The mmdet name of one original/timm key (None: a derived buffer to drop) and the kind of
    reordering it needs (``"reduction"``, ``"norm"`` or ``""``, see `reorder_merge`).

    Args:
        rest: the key without prefixes (``layers.0.blocks.1.attn.qkv.weight``).
        timm_layout: timm's layout (patch merging at the start of the next stage).
    """
    if rest.startswith("patch_embed.proj."):
        return "patch_embed.projection." + rest[len("patch_embed.proj."):], ""
    match = _LAYER.match(rest)
    if match is None:
        return rest, ""  # final norm, head: no counterpart, reported as unexpected
    stage, tail = int(match.group(1)), match.group(2)
    if tail.startswith("downsample."):
        stage -= 1 if timm_layout else 0
        kind = "reduction" if tail.startswith("downsample.reduction.") else "norm"
        return f"stages.{stage}.{tail}", kind
    if tail.endswith("attn_mask"):
        return None  # the shift mask, recomputed for every input size
    tail = re.sub(r"\.attn\.", ".attn.w_msa.", tail)
    tail = tail.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
    return f"stages.{stage}.{tail}", ""


def _fit_window(name: str, tensor: Tensor, target: dict[str, Tensor]) -> Tensor:
    """Resize a bias table / replace an index buffer that belongs to another window size."""
    ref = target.get(name)
    if ref is None or ref.shape == tensor.shape:
        return tensor
    if name.endswith("relative_position_index"):
        return ref.detach().clone()
    if name.endswith("relative_position_bias_table") and tensor.shape[1] == ref.shape[1]:
        heads = tensor.shape[1]
        side, new_side = math.isqrt(tensor.shape[0]), math.isqrt(ref.shape[0])
        grid = tensor.float().transpose(0, 1).reshape(1, heads, side, side)
        grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic")
        return grid.view(heads, -1).transpose(0, 1).contiguous().to(tensor.dtype)
    return tensor  # a real mismatch: the loader reports it


def to_mmdet_swin_state_dict(state_dict: dict[str, Tensor],
                             target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename and reorder a Swin checkpoint to mmdet's layout (see the module docstring).

    Args:
        state_dict: checkpoint tensors; keys may carry ``module.`` / ``backbone.`` / ... prefixes,
            which are kept.
        target: the module's state dict (names and shapes; may live on the meta device).

    Returns:
        A new dict; unchanged when the layout is not a Swin one.
    """
    split = {k: _split_prefix(k) for k in state_dict}
    layout = swin_layout([rest for _, rest in split.values()])
    if layout == "unknown":
        return dict(state_dict)
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        prefix, rest = split[key]
        if layout != "mmdet":
            renamed = rename_key(rest, layout == "timm")
            if renamed is None:
                continue
            rest, kind = renamed
            tensor = reorder_merge(tensor, kind)
        out[prefix + rest] = _fit_window(rest, tensor, target)
    if layout == "timm":  # timm does not store the index buffers: they are constants of the window
        out.update({k: v.detach().clone() for k, v in target.items()
                    if k.endswith("relative_position_index")})
    return out
