"""Hybrid FAN backbones: sizes, parameter counts, shapes, gradients, TAO names, training."""
import math

import pytest
import torch

from codetr.model.backbone import Backbone
from codetr.model.fan import FAN_ARCHS, build_fan
from tiny_detector import loss_fell, train_losses

# Channels of slots 0..3 (strides 4, 8, 16, 32): TAO's ``out_channels`` of each FAN size.
TAO_OUT_CHANNELS = {"fan_tiny": [128, 256, 192, 768], "fan_small": [128, 256, 384, 768],
                    "fan_base": [128, 256, 448, 768], "fan_large": [128, 256, 480, 768]}


def tao_layout_parameter_count(embed_dim, depth, heads, conv_depths):
    """Parameters of TAO's FAN-hybrid (DINO backbone, 4 outputs), counted layer by layer from
    the public definition (nvidia_tao_pytorch/cv/dino/model/fan.py, convnext_utils.py)."""
    d = embed_dim

    def convnext_block(c):  # dw7x7+b, LN, 1x1 c->4c, 1x1 4c->c, gamma
        return 49 * c + c + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c) + c

    n = 3 * 128 * 16 + 128 + 2 * 128                                   # stem conv + LN
    n += conv_depths[0] * convnext_block(128)
    n += 2 * 128 + 128 * 256 * 4 + 256 + conv_depths[1] * convnext_block(256)  # downsample
    n += 256 * d * 4 + d + d + 64 * d + d                              # proj, cls_token, pos
    h = 4 * d
    fan_block = (2 * d + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d) + 2 * d + heads
                 + (d * h + h) + (9 * h + h) + 2 * h + (9 * h + h) + h + (h * d + d)
                 + 2 * d + (d * d + d) + 2 * d)
    class_block = 2 * d + 4 * (d * d + d) + 2 * d + (d * h + h) + (h * d + d) + 2 * d
    n += depth * fan_block + 2 * class_block
    n += 2 * (128 + 256 + d + 768) + d * 768 * 9 + 768                # out norms, downsample
    return n


@pytest.mark.parametrize("name", list(FAN_ARCHS))
def test_each_size_builds_with_tao_channels_strides_and_parameter_count(name):
    arch = FAN_ARCHS[name]
    with torch.device("meta"):  # the big sizes in milliseconds, no memory
        fan = build_fan(name, (0, 1, 2, 3))
    assert fan.out_channels == TAO_OUT_CHANNELS[name]
    assert fan.strides == [4, 8, 16, 32]
    count = sum(p.numel() for p in fan.parameters())
    assert count == tao_layout_parameter_count(arch.embed_dim, arch.depth, arch.num_heads,
                                               arch.conv_depths)
    if name == "fan_large":
        # The FAN paper (Zhou et al. 2022, abstract: "87.1% ... with 76.8M parameters") gives the
        # ImageNet FAN-L-Hybrid: our trunk minus the detection-only layers, plus its final norm
        # and 1000-class head, lands in [76.8, 76.9) M.
        detection_only = sum(p.numel() for k, p in fan.named_parameters()
                             if k.startswith(("learnable_downsample", "out_norm")))
        d = arch.embed_dim
        classifier = count - detection_only + 2 * d + d * 1000 + 1000
        assert 76.8e6 <= classifier < 76.9e6, classifier


def test_slot_subsets_on_backbone():
    backbone = Backbone("fan_small", [1, 2, 3, 4])
    assert backbone.slots == [1, 2, 3] and backbone.num_extra_levels == 1
    assert backbone.out_channels == [256, 384, 768] and backbone.strides == [8, 16, 32]
    assert not hasattr(backbone.body, "out_norm0")  # as TAO: a norm per returned level only


def test_fan_tiny_forward_backward_non_square():
    torch.manual_seed(0)
    backbone = Backbone("fan_tiny", [0, 1, 2, 3]).train()
    images = torch.randn(2, 3, 100, 150)  # not a multiple of 16: padded, then cropped back
    outs = backbone(images)
    assert [tuple(o.shape) for o in outs] == [
        (2, c, math.ceil(100 / s), math.ceil(150 / s))
        for c, s in zip([128, 256, 192, 768], [4, 8, 16, 32])]
    sum(o.square().mean() for o in outs).backward()
    grads = {k: p.grad for k, p in backbone.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [k for k, g in grads.items() if g is None]
    assert grads["body.blocks.7.mlp.temperature"].abs().sum() > 0
    assert grads["body.cls_attn_blocks.1.norm2.weight"].abs().sum() > 0
    # As in TAO's FAN, the class token is dropped before the stride-32 level and patch tokens
    # never attend to it: the class-token-only parameters get exactly zero gradient.
    assert grads["body.cls_token"].abs().sum() == 0
    assert grads["body.cls_attn_blocks.1.mlp.fc2.weight"].abs().sum() == 0


def test_activation_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_fan("fan_tiny", (2, 3), drop_path_rate=0.0).train()
    ckpt = build_fan("fan_tiny", (2, 3), drop_path_rate=0.0, activation_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 64, 96)
    for model in (plain, ckpt):
        sum(o.sum() for o in model(images)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tao_checkpoint_names_load(tmp_path):
    """A TAO-layout file (TAO DINO prefix, the old ``pos_embeder`` spelling, a fused class-attention
    qkv, a classifier head) loads by name and reproduces the source model's features."""
    torch.manual_seed(0)
    source = build_fan("fan_tiny", (0, 1, 2, 3)).eval()
    names = set(source.state_dict())
    for key in ("patch_embed.backbone.stem.0.weight", "patch_embed.backbone.stages.1.downsample.1.weight",
                "patch_embed.backbone.stages.0.blocks.2.mlp.fc1.weight", "patch_embed.proj.weight",
                "pos_embed.token_projection.weight", "cls_token", "blocks.7.attn.kv.weight",
                "blocks.0.mlp.mlp_v.dwconv.bn.running_var", "blocks.0.mlp.norm_v.weight",
                "cls_attn_blocks.1.attn.v.bias", "cls_attn_blocks.0.mlp.fc2.weight",
                "out_norm3.weight", "learnable_downsample.weight"):
        assert key in names, key
    state = {}
    for key, value in source.state_dict().items():
        key = key.replace("pos_embed.", "pos_embeder.")
        state[f"model.backbone.0.body.{key}"] = value
    for i in range(2):
        prefix = f"model.backbone.0.body.cls_attn_blocks.{i}.attn."
        for kind in ("weight", "bias"):
            state[f"{prefix}qkv.{kind}"] = torch.cat([state.pop(f"{prefix}{p}.{kind}") for p in "qkv"])
    state["head.weight"] = torch.zeros(1000, 192)
    path = tmp_path / "fan_tiny_tao.pth"
    torch.save({"state_dict": state}, path)
    backbone = Backbone("fan_tiny", [0, 1, 2, 3], pretrained_path=str(path)).eval()
    report = backbone.load_report
    assert not report.missing and not report.mismatched and report.unexpected == ["head.weight"]
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        for a, b in zip(source(images), backbone(images)):
            torch.testing.assert_close(a, b)


def test_tiny_codetr_with_fan_tiny_trains():
    losses = train_losses(["model.backbone=fan_tiny", "train.activation_checkpoint=true"])
    assert all(math.isfinite(v) for v in losses)
    assert loss_fell(losses), losses


@pytest.mark.parametrize("name", ["fan_small", "fan_base", "fan_large"])
def test_bigger_sizes_forward_backward_non_square(name):
    torch.manual_seed(0)
    backbone = Backbone(name, [0, 1, 2, 3]).train()
    outs = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(TAO_OUT_CHANNELS[name], [4, 8, 16, 32])]
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())
