"""`codetr.zoo.swin_keys`: Sense-X's original-name Swin checkpoints -> mmdet's Swin names.

The patch-merging re-order is checked numerically: timm's `PatchMerging` (the original concat
order) with the original weights against mmdet's `nn.Unfold` formulation (the reference README,
Swin rule 9) with the converted weights.
"""
from __future__ import annotations

import json
import re

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging

from codetr.zoo import import_official
from codetr.zoo.swin_keys import has_original_swin_names, original_swin_to_mmdet, unfold_order


def _mmdet_merge(x, norm_w, norm_b, reduction_w):
    """mmdet's PatchMerging on `[B, H, W, C]` (even H, W): unfold 2x2, LayerNorm(4C), Linear."""
    batch, h, w, c = x.shape
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # [B, 4C, L], c*4 + kh*2 + kw
    merged = F.layer_norm(cols.transpose(1, 2), (4 * c,), norm_w, norm_b)
    return (merged @ reduction_w.T).reshape(batch, h // 2, w // 2, -1)


def test_the_merge_reorder_matches_timm_numerically():
    torch.manual_seed(0)
    channels = 8
    original = PatchMerging(channels).eval()
    with torch.no_grad():
        original.norm.weight.normal_(1.0, 0.2)
        original.norm.bias.normal_(0.0, 0.2)
    x = torch.randn(2, 6, 10, channels)
    state = {f"backbone.layers.0.downsample.{k}": v for k, v in original.state_dict().items()}
    converted = original_swin_to_mmdet(state)
    got = _mmdet_merge(x, converted["backbone.stages.0.downsample.norm.weight"],
                       converted["backbone.stages.0.downsample.norm.bias"],
                       converted["backbone.stages.0.downsample.reduction.weight"])
    with torch.no_grad():
        want = original(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Without the re-order the two disagree: the test can fail.
    wrong = _mmdet_merge(x, original.norm.weight, original.norm.bias, original.reduction.weight)
    assert (wrong - want).abs().max() > 0.1


def test_unfold_order_is_a_permutation():
    t = torch.arange(16.0)
    assert sorted(unfold_order(t).tolist()) == t.tolist() and not torch.equal(unfold_order(t), t)


def _to_original(key: str) -> str:
    """mmdet Swin name -> original name (the inverse of the map, for the test)."""
    key = key.replace("backbone.patch_embed.projection.", "backbone.patch_embed.proj.")
    key = key.replace(".attn.w_msa.", ".attn.").replace(".ffn.layers.0.0.", ".mlp.fc1.")
    key = key.replace(".ffn.layers.1.", ".mlp.fc2.")
    return re.sub(r"^backbone\.stages\.", "backbone.layers.", key)


def test_the_full_swin_l_list_in_original_names_converts_to_mmdet_names(mmdet_reference):
    keys = json.loads((mmdet_reference / "keys_co_dino_5scale_swin_l.json").read_text())["keys"]
    mmdet = {k: torch.empty(v["shape"], device="meta") for k, v in keys.items()}
    original = {_to_original(k): v for k, v in mmdet.items()}
    assert has_original_swin_names(original) and not has_original_swin_names(mmdet)
    converted = original_swin_to_mmdet(original)
    assert list(converted) == list(mmdet)
    assert all(converted[k].shape == mmdet[k].shape for k in mmdet)
    # import_official converts on the fly: both spellings map to the same codetr names.
    target = {"backbone.body." + k[len("backbone."):]: v for k, v in mmdet.items() if k.startswith("backbone.")}
    _, from_original = import_official(original, target, "original")
    _, from_mmdet = import_official(mmdet, target, "mmdet")
    assert from_original.mapped == from_mmdet.mapped and len(from_mmdet.mapped) == len(target) == 357
