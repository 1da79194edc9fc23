"""The Swin backbone: spec names, official Swin-L keys, training features, fused attention."""
import json
import math

import pytest
import torch
from torch import nn

from codetr.model import swin as swin_module
from codetr.model.backbone import SWIN_NAMES, Backbone
from codetr.model.builder import build_model
from codetr.model.swin import SWIN_ARCHS, SwinTransformer
from codetr.model.swin_attention import WindowMSA, shift_attention_mask
from codetr.spec import load_spec


def _tiny(**kwargs) -> SwinTransformer:
    return SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8), **{"window": 7, **kwargs})


def test_swin_l_keys_of_the_official_config(mmdet_reference):
    """Every backbone key of co_dino_5scale_swin_l_16xb1_1x_coco.py is ours under backbone.body."""
    official = json.loads((mmdet_reference / "keys_co_dino_5scale_swin_l.json").read_text())
    expected = {k[len("backbone."):]: tuple(v["shape"]) for k, v in official["keys"].items()
                if k.startswith("backbone.")}
    assert len(expected) == official["keys_per_top_module"]["backbone"] == 357
    with torch.device("meta"):  # 195M parameters: names and shapes only
        five = Backbone("swin_large_patch4_window12_384", [0, 1, 2, 3, 4])
        four = Backbone("swin_large_patch4_window12_384", [1, 2, 3, 4])
    ours = {k: tuple(v.shape) for k, v in five.body.state_dict().items()}
    assert ours == expected  # both ways: nothing missing, nothing extra, same shapes
    # CoDETR names the Backbone "backbone": mmdet's backbone.X is our backbone.body.X.
    assert all(f"body.{k}" in five.state_dict() for k in expected)
    params = sum(p.numel() for p in five.body.parameters())
    assert params == official["params_per_top_module"]["backbone"] == 195_201_204
    # mmdet builds norm{i} only for returned stages: a 4-scale model has no norm0.
    assert set(expected) - set(four.body.state_dict()) == {"norm0.weight", "norm0.bias"}
    assert five.out_channels == [192, 384, 768, 1536] and five.strides == [4, 8, 16, 32]
    assert five.num_extra_levels == 1 and four.out_channels == [384, 768, 1536]


# The Swin paper's sizes (Liu et al. 2021, Table 7 / the microsoft release configs).
PAPER = {"tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
         "large": (192, (2, 2, 18, 2), (6, 12, 24, 48))}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_codino_swin_l_spec_has_the_official_backbone_keys(mmdet_reference, checkpointing):
    """The importer's rule on the model the spec builds: mmdet backbone.X -> backbone.body.X."""
    official = json.loads((mmdet_reference / "keys_co_dino_5scale_swin_l.json").read_text())
    spec = load_spec(None, ["model.backbone=swin_large_patch4_window12_384",
                            "model.num_feature_levels=5", "model.return_interm_indices=[0,1,2,3,4]",
                            f"train.activation_checkpoint={str(checkpointing).lower()}"])
    with torch.device("meta"):
        model = build_model(spec, num_classes=80)
    ours = model.state_dict()
    for key, info in official["keys"].items():
        if key.startswith("backbone."):
            mapped = "backbone.body." + key[len("backbone."):]
            assert tuple(ours[mapped].shape) == tuple(info["shape"]), key
    assert all(stage.with_cp == checkpointing for stage in model.backbone.body.stages)


@pytest.mark.parametrize("name", list(SWIN_NAMES))
def test_spec_names_build_their_architecture(name):
    size = name.split("_")[1]  # swin_<size>_...
    window = 12 if "384" in name else 7  # 224 px pretraining: window 7; 384 px: window 12
    arch = SWIN_ARCHS[size]
    assert (arch.embed_dims, arch.depths, arch.num_heads) == PAPER[size]
    with torch.device("meta"):
        backbone = Backbone(name, [1, 2, 3, 4])
    body = backbone.body
    dims = [arch.embed_dims * 2 ** i for i in range(4)]
    assert body.patch_embed.projection.out_channels == arch.embed_dims
    assert backbone.out_channels == dims[1:] and backbone.strides == [8, 16, 32]
    for stage, depth, heads, dim in zip(body.stages, arch.depths, arch.num_heads, dims):
        assert len(stage.blocks) == depth
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            assert attn.window == window and attn.w_msa.num_heads == heads
            assert attn.shift == (window // 2 if j % 2 else 0)  # every odd block, every stage
            assert attn.w_msa.relative_position_bias_table.shape == ((2 * window - 1) ** 2, heads)
            assert block.norm1.normalized_shape == (dim,)


def test_swin_tiny_forward_backward_at_a_non_square_input():
    torch.manual_seed(0)
    backbone = Backbone("swin_tiny_224_1k", [0, 1, 2, 3, 4]).train()
    assert backbone.out_channels == [96, 192, 384, 768] and backbone.num_extra_levels == 1
    height, width = 100, 76  # not multiples of the patch (4) nor of the window (7)
    outs = backbone(torch.randn(2, 3, height, width))
    for out, c, s in zip(outs, backbone.out_channels, backbone.strides):
        assert out.shape == (2, c, math.ceil(height / s), math.ceil(width / s))
        assert out.is_contiguous() and torch.isfinite(out).all()
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    body = backbone.body
    for param in (body.patch_embed.projection.weight, body.norm0.weight, body.norm3.weight,
                  body.stages[3].blocks[1].attn.w_msa.relative_position_bias_table,
                  body.stages[2].downsample.reduction.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_activation_checkpointing_recomputes_blocks_with_equal_gradients(monkeypatch):
    calls = []
    real = swin_module.checkpoint
    monkeypatch.setattr(swin_module, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = _tiny(drop_path_rate=0.2).train()
    images = torch.randn(2, 3, 60, 44)
    grads = []
    for enabled in (False, True):
        model.set_activation_checkpoint(enabled)
        model.zero_grad()
        torch.manual_seed(1)  # the same DropPath draws: checkpoint replays the RNG state
        sum(o.square().mean() for o in model(images)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(calls) == 8  # every block of the second pass, none of the first
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradients: nothing to save, no recomputation
        model(images)
    assert len(calls) == 8


def test_backbone_turns_checkpointing_on_from_the_spec_flag():
    with torch.device("meta"):
        on = Backbone("swin_tiny_224_1k", [1, 2, 3], activation_checkpoint=True)
        off = Backbone("swin_tiny_224_1k", [1, 2, 3])
    assert all(s.with_cp for s in on.body.stages) and not any(s.with_cp for s in off.body.stages)


def test_drop_path_is_linear_over_blocks_and_off_in_eval():
    model = _tiny(drop_path_rate=0.3)
    rates = [0.0 if isinstance(b.ffn.drop_path, nn.Identity) else b.ffn.drop_path.drop_prob
             for s in model.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 8).tolist())
    images = torch.randn(1, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images), model(images), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    first = model(images)
    torch.manual_seed(1)
    assert not torch.equal(first[-1], model(images)[-1])


def test_fused_window_attention_equals_the_explicit_softmax():
    """SDPA with bias + shift mask as attn_mask: same values and bias-table gradients as mmdet's
    explicit ``softmax(q k^T * scale + bias + mask) v``."""
    torch.manual_seed(0)
    attn = WindowMSA(embed_dims=32, num_heads=4, window=4)
    nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    mask = shift_attention_mask(8, 12, 4, 2)  # [6 windows, 16, 16]
    x = torch.randn(2 * 6, 16, 32)
    fused = attn(x, mask)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), attn.relative_position_bias_table)
    q, k, v = attn.qkv(x).view(12, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    # Swin's relative position bias written out: token i at (yi, xi) attending to j at
    # (yj, xj) reads row (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1) of the table.
    w, table = 4, attn.relative_position_bias_table  # [(2w - 1)^2, heads]
    rows = torch.tensor([[(i // w - j // w + w - 1) * (2 * w - 1) + (i % w - j % w + w - 1)
                          for j in range(w * w)] for i in range(w * w)])
    bias = table[rows].permute(2, 0, 1)  # [heads, N, N]
    logits = (q * attn.scale) @ k.transpose(-2, -1) + bias
    logits = (logits.view(2, 6, 4, 16, 16) + mask[None, :, None]).view(12, 4, 16, 16)
    explicit = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(12, 16, 32))
    (g_explicit,) = torch.autograd.grad(explicit.square().sum(), attn.relative_position_bias_table)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_explicit, rtol=1e-4, atol=1e-5)


def test_shift_mask_regions():
    mask = shift_attention_mask(8, 8, 4, 2)  # 2x2 windows; the last row/column are split
    assert mask.shape == (4, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window holds one region
    assert (mask[3] == -100).sum() == 16 * 16 - 4 * 4 * 4  # 4 regions of 4 tokens each


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="out_indices"):
        _tiny(out_indices=(2, 1))
    with pytest.raises(ValueError, match="divisible"):
        WindowMSA(10, 3, 4)
    with pytest.raises(ValueError, match="timm_name"):
        Backbone("swin_tiny_224_1k", [1, 2, 3], timm_name="swin_tiny_patch4_window7_224")
