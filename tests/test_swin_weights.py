"""Loading Swin weights of the three layouts (mmdet, original microsoft release, timm).

The independent reference for the name map and the patch-merging channel permutation is timm's
SwinTransformer: with the same weights it computes the same maps as mmdet's Swin wherever their
rules coincide (every map a multiple of the window and larger than it, so there is no padding and
timm keeps every shift), up to mmdet's per-level norms, which are applied to timm's levels here.
"""
import re

import pytest
import timm
import torch
from torch import nn

from codetr.model.backbone import Backbone
from codetr.model.pretrained import load_backbone_weights
from codetr.model.swin import SwinTransformer
from codetr.model.swin_weights import (concat_to_unfold_norm, concat_to_unfold_reduction,
                                       swin_layout)

HEIGHT, WIDTH = 448, 672  # maps 112x168 ... 14x21: multiples of 7, all larger than the window
NORMS = ["norm0.weight", "norm0.bias", "norm1.weight", "norm1.bias", "norm2.weight",
         "norm2.bias", "norm3.weight", "norm3.bias"]


def _timm_tiny() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
                              depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=0,
                              img_size=(HEIGHT, WIDTH)).eval()  # timm fixes its shifts at img_size
    with torch.no_grad():  # every LayerNorm / bias non-trivial, so that any mis-permutation shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _ours(window: int = 7) -> SwinTransformer:
    model = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8), window=window).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for i in range(4):
            getattr(model, f"norm{i}").weight.normal_(1, 0.2)
            getattr(model, f"norm{i}").bias.normal_(0, 0.2)
    return model


def _to_original(timm_state: dict) -> dict:
    """timm names -> the original release's: merging at the end of the previous stage, plus the
    buffers the original stores (index, shift mask)."""
    def earlier(match):
        return f"layers.{int(match.group(1)) - 1}.downsample"
    out = {re.sub(r"layers\.(\d+)\.downsample", earlier, k).replace("head.fc.", "head."): v
           for k, v in timm_state.items()}
    index = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8), window=7).state_dict()[
        "stages.0.blocks.0.attn.w_msa.relative_position_index"]
    blocks = {m.group(1) for k in timm_state for m in [re.match(r"(layers\.\d+\.blocks\.\d+)\.", k)]
              if m}
    for block in blocks:
        out[f"{block}.attn.relative_position_index"] = index
        if int(block[-1]) % 2:
            out[f"{block}.attn_mask"] = torch.zeros(4, 49, 49)
    if "head.weight" not in out:
        out["head.weight"], out["head.bias"] = torch.zeros(10, 128), torch.zeros(10)
    return out


LAYOUTS = {  # name -> (file content from timm's state dict, expected unexpected keys)
    "timm": (lambda s: s, {"norm.weight", "norm.bias"}),
    "original": (lambda s: {"model": _to_original(s)},
                 {"norm.weight", "norm.bias", "head.weight", "head.bias"}),
    "codetr timm features_only": (
        lambda s: {"state_dict": {"backbone.body." + k.replace("layers.", "layers_", 1): v
                                  for k, v in s.items() if not k.startswith("norm.")}}, set()),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_layouts_load_and_compute_timm_features(tmp_path, layout):
    reference = _timm_tiny()
    wrap, unexpected = LAYOUTS[layout]
    torch.save(wrap(reference.state_dict()), tmp_path / "swin.pth")
    model = _ours()
    report = load_backbone_weights(model, tmp_path / "swin.pth")
    assert report.missing == NORMS  # mmdet's new per-level norms; everything else loads
    assert report.mismatched == [] and set(report.unexpected) == unexpected
    images = torch.randn(1, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        ours = model(images)
        x = reference.patch_embed(images)
        for i, stage in enumerate(reference.layers):
            x = stage(x)  # [B, H, W, C]
            expected = getattr(model, f"norm{i}")(x).permute(0, 3, 1, 2)
            torch.testing.assert_close(ours[i], expected, rtol=1e-4, atol=1e-4)


def test_mmdet_layout_round_trips_wrapped_as_a_codino_checkpoint(tmp_path):
    source = _ours()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param))
    state = {"backbone." + k: v for k, v in source.state_dict().items()}
    state["neck.convs.0.conv.weight"] = torch.zeros(4, 4, 1, 1)
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, tmp_path / "codino.pth")
    model = _ours()
    report = load_backbone_weights(model, tmp_path / "codino.pth")
    assert report.missing == [] and report.mismatched == []
    assert report.unexpected == ["neck.convs.0.conv.weight"]
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_window_7_weights_into_a_window_12_model(tmp_path):
    torch.save(_timm_tiny().state_dict(), tmp_path / "w7.pth")
    model = _ours(window=12)
    report = load_backbone_weights(model, tmp_path / "w7.pth")
    assert report.mismatched == [] and report.missing == NORMS
    table = model.stages[0].blocks[0].attn.w_msa.relative_position_bias_table
    assert table.shape == (23 * 23, 1)  # bicubically resized from 13 x 13, as mmdet does
    fresh = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8), window=12).state_dict()
    for key in (k for k in fresh if k.endswith("relative_position_index")):
        torch.testing.assert_close(model.state_dict()[key], fresh[key], rtol=0, atol=0)


def test_unfold_permutation_matches_nn_unfold():
    """concat (original/timm) -> Unfold (mmdet) order, checked on nn.Unfold itself."""
    torch.manual_seed(0)
    c = 3
    x = torch.randn(1, c, 4, 6)
    unfold = nn.Unfold(2, stride=2)(x).transpose(1, 2)  # [1, L, 4C]
    grid = x.permute(0, 2, 3, 1)
    concat = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2],
                        grid[:, 1::2, 1::2]], -1).flatten(1, 2)  # [1, L, 4C]
    perm = _permutation(c)
    torch.testing.assert_close(unfold, concat[..., perm], rtol=0, atol=0)
    weight, norm = torch.randn(5, 4 * c), torch.randn(4 * c)
    torch.testing.assert_close(unfold @ concat_to_unfold_reduction(weight).t(), concat @ weight.t())
    torch.testing.assert_close(unfold * concat_to_unfold_norm(norm), (concat * norm)[..., perm])


def _permutation(c: int) -> list[int]:
    """Column of the concat vector that holds Unfold channel i (4 * ch + offset)."""
    concat_block = {0: 0, 1: 2, 2: 1, 3: 3}  # unfold offset kh * 2 + kw -> concat block
    return [concat_block[i % 4] * c + i // 4 for i in range(4 * c)]


def test_layout_detection():
    assert swin_layout(["stages.0.blocks.0.norm1.weight"]) == "mmdet"
    assert swin_layout(["layers.0.downsample.norm.weight", "layers.0.blocks.0.attn.qkv.weight"]) \
        == "original"
    assert swin_layout(["layers_1.downsample.norm.weight"]) == "timm"
    assert swin_layout(["conv1.weight"]) == "unknown"


def test_backbone_loads_the_original_swin_t_release_layout(tmp_path):
    """``model.pretrained_backbone_path`` with a Swin-T file in the microsoft release layout."""
    with torch.no_grad():
        source = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict()
    torch.save({"model": _to_original(source)}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    backbone = Backbone("swin_tiny_224_1k", [1, 2, 3, 4],
                        pretrained_path=str(tmp_path / "swin_tiny_patch4_window7_224.pth"))
    report = backbone.load_report
    assert report.missing == NORMS[2:] and report.mismatched == []  # 4-scale: no norm0
    assert set(report.unexpected) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    body = backbone.body.state_dict()
    torch.testing.assert_close(body["stages.2.blocks.5.ffn.layers.0.0.weight"],
                               source["layers.2.blocks.5.mlp.fc1.weight"], rtol=0, atol=0)
    merging = source["layers.2.downsample.reduction.weight"]  # timm: stage 1's, at stage 2's start
    torch.testing.assert_close(body["stages.1.downsample.reduction.weight"],
                               concat_to_unfold_reduction(merging), rtol=0, atol=0)
