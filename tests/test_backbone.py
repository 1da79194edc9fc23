"""Backbones (one tiny member per family), the ViT simple feature pyramid and weight loading."""
import math

import pytest
import timm
import torch
from torch import nn

from codetr.model.backbone import FAN_NAMES, SWIN_NAMES, TIMM_NAMES, Backbone, timm_model_name
from codetr.model.pretrained import (efficientnet_lite0_package_state_dict,
                                     load_backbone_weights)
from codetr.model.vit_pyramid import SimpleFeaturePyramid, create_vit, vit_feature_map
from codetr.spec.schema import BACKBONES

H, W = 96, 64  # divisible by 32, as the collate pads


def _check_levels(outs, channels, strides, height=H, width=W):
    assert len(outs) == len(channels) == len(strides)
    for out, c, s in zip(outs, channels, strides):
        assert out.shape == (2, c, math.ceil(height / s), math.ceil(width / s))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, timm_name, slots, channels, strides, extra", [
    ("resnet_18", None, [1, 2, 3, 4], [128, 256, 512], [8, 16, 32], 1),
    ("resnet_50", "resnet18", [0, 1, 2, 3], [64, 128, 256, 512], [4, 8, 16, 32], 0),
    ("swin_tiny_224_1k", None, [1, 2, 3, 4], [192, 384, 768], [8, 16, 32], 1),
    ("efficientvit_b1", "efficientvit_b0", [0, 1, 2, 3], [16, 32, 64, 128], [4, 8, 16, 32], 0),
    ("efficientnet_lite0", None, [1, 2, 3, 4], [40, 112, 320], [8, 16, 32], 1),
])
def test_timm_family_levels(name, timm_name, slots, channels, strides, extra):
    torch.manual_seed(0)
    backbone = Backbone(name, slots, timm_name=timm_name)
    assert backbone.out_channels == channels and backbone.strides == strides
    assert backbone.num_extra_levels == extra
    outs = backbone(torch.randn(2, 3, H, W))
    _check_levels(outs, channels, strides)


def test_resnet_dilation_keeps_stride_16():
    backbone = Backbone("resnet_50", [1, 2, 3, 4], dilation=True, timm_name="resnet18")
    assert backbone.strides == [8, 16, 16] and backbone.num_extra_levels == 1
    outs = backbone(torch.randn(2, 3, H, W))
    _check_levels(outs, [128, 256, 512], [8, 16, 16])
    with pytest.raises(ValueError, match="dilation"):
        Backbone("efficientvit_b0", [1, 2, 3], dilation=True)


def test_vit_pyramid_all_slots_with_padding():
    torch.manual_seed(0)
    backbone = Backbone("vit_large_dinov2", [0, 1, 2, 3, 4], pyramid_channels=32,
                        timm_name="vit_small_patch14_dinov2")
    assert backbone.strides == [4, 8, 16, 32, 64] and backbone.num_extra_levels == 0
    height, width = 100, 72  # not multiples of 16: padded inside, sizes are ceil(H / stride)
    outs = backbone(torch.randn(2, 3, height, width))
    _check_levels(outs, [32] * 5, [4, 8, 16, 32, 64], height, width)
    outs[0].sum().backward()  # p2 reaches the trunk through both transposed convs
    assert backbone.body.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_vit_feature_map_resizes_patch14_to_stride16():
    vit = create_vit("vit_small_patch14_dinov2")
    grid = vit_feature_map(vit, torch.randn(1, 3, 64, 80))
    assert grid.shape == (1, vit.embed_dim, 4, 5)
    assert not hasattr(vit.head, "weight")  # classification head pruned


def test_simple_feature_pyramid_subset_and_errors():
    sfp = SimpleFeaturePyramid(in_channels=48, out_channels=16, slots=[2, 3, 4])
    outs = sfp(torch.randn(2, 48, 6, 5))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 6, 5), (2, 16, 3, 3), (2, 16, 2, 2)]
    assert set(sfp.levels) == {"p4", "p5"}
    with pytest.raises(ValueError, match="slot 3"):
        SimpleFeaturePyramid(48, 16, [4])


def test_names_and_slot_validation():
    assert set(TIMM_NAMES) | set(SWIN_NAMES) | set(FAN_NAMES) == set(BACKBONES)
    assert timm_model_name("resnet_50") == "resnet50"
    with pytest.raises(ValueError, match="not timm"):
        timm_model_name("swin_large_384_22k")
    for name in TIMM_NAMES.values():
        assert timm.is_model(name), name
    with pytest.raises(ValueError, match="not timm"):
        timm_model_name("fan_tiny")
    with pytest.raises(ValueError, match="unknown backbone"):
        Backbone("resnet_101", [1, 2, 3])
    for bad in ([1, 3], [3, 2], [], [2, 3, 4, 5]):
        with pytest.raises(ValueError, match="consecutive"):
            Backbone("resnet_18", bad)
    with pytest.raises(ValueError, match="natively"):
        Backbone("resnet_18", [4])


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet_18"])
def test_cnn_trunk_runs_channels_last_with_the_same_values_and_gradients(name):
    """Channels_last is a memory layout only: outputs and gradients equal the NCHW trunk's."""
    torch.manual_seed(0)
    fast = Backbone(name, [1, 2, 3]).train()
    assert fast.memory_format == torch.channels_last
    conv = next(m for m in fast.body.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    slow = Backbone(name, [1, 2, 3], channels_last=False).train()
    slow.load_state_dict(fast.state_dict())
    assert slow.memory_format == torch.contiguous_format
    images = torch.randn(2, 3, H, W)
    outs_fast, outs_slow = fast(images), slow(images)
    for a, b in zip(outs_fast, outs_slow):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # summation order
    weights = [torch.randn_like(o) for o in outs_fast]
    sum((o * w).sum() for o, w in zip(outs_fast, weights)).backward()
    sum((o * w).sum() for o, w in zip(outs_slow, weights)).backward()
    conv_slow = next(m for m in slow.body.modules() if isinstance(m, nn.Conv2d))
    # first-layer gradients sum over the whole net: compare the tensor's relative error
    error = (conv.weight.grad - conv_slow.weight.grad).norm() / conv_slow.weight.grad.norm()
    assert error < 1e-3, error


def test_swin_trunk_stays_contiguous():
    assert Backbone("swin_tiny_224_1k", [1, 2, 3]).memory_format == torch.contiguous_format


def test_frozen_backbone_keeps_bn_statistics():
    torch.manual_seed(0)
    backbone = Backbone("resnet_18", [1, 2, 3], train_backbone=False).train()
    assert not any(p.requires_grad for p in backbone.parameters())
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    before = bns[0].running_mean.clone()
    backbone(torch.randn(2, 3, H, W))
    torch.testing.assert_close(bns[0].running_mean, before)


def test_trainable_backbone_updates_bn_and_gets_gradients():
    torch.manual_seed(0)
    backbone = Backbone("resnet_18", [1, 2, 3]).train()
    bn = next(m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert type(bn) is nn.BatchNorm2d and bn.weight.requires_grad  # not a frozen BN variant
    before = bn.running_mean.clone()
    sum(o.mean() for o in backbone(torch.randn(2, 3, H, W))).backward()
    assert not torch.equal(bn.running_mean, before)
    assert backbone.body.conv1.weight.grad.abs().sum() > 0


def test_frozen_vit_keeps_pyramid_trainable():
    backbone = Backbone("vit_large_codetr", [2, 3], train_backbone=False, pyramid_channels=16,
                        timm_name="vit_small_patch14_dinov2")
    assert not any(p.requires_grad for p in backbone.body.parameters())
    assert all(p.requires_grad for p in backbone.pyramid.parameters())


def test_load_wrapped_prefixed_checkpoint(tmp_path):
    torch.manual_seed(0)
    # A full timm classifier (top-level stage names "stages.0") into a features_only trunk
    # (renamed "stages_0"), wrapped and prefixed as mmdet/Lightning checkpoints are.
    source = timm.create_model("efficientvit_b0", pretrained=False).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in source.items()}}, path)
    backbone = Backbone("efficientvit_b0", [1, 2, 3], pretrained_path=str(path))
    report = backbone.load_report
    assert report.missing == [] and report.mismatched == []
    assert report.unexpected and all(".head." in k for k in report.unexpected)
    loaded = backbone.body.state_dict()
    torch.testing.assert_close(loaded["stages_0.blocks.0.main.depth_conv.conv.weight"],
                               source["stages.0.blocks.0.main.depth_conv.conv.weight"])


def test_load_reports_mismatch_and_rejects_bad_files(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {"0.weight": torch.randn(5, 3, 3, 3), "0.bias": torch.randn(4),
             "1.weight": torch.randn(4)}
    torch.save({"model": state}, tmp_path / "a.pth")
    report = load_backbone_weights(module, tmp_path / "a.pth")
    assert report.loaded == ["0.bias", "1.weight"]
    assert report.mismatched == [("0.weight", (5, 3, 3, 3), (4, 3, 3, 3))]
    assert "1.bias" in report.missing and "0.weight" not in report.missing
    torch.testing.assert_close(module[0].bias.data, state["0.bias"])
    assert "shape mismatch, skipped" in report.summary()
    torch.save({"foo.weight": torch.randn(2)}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="no tensor"):
        load_backbone_weights(module, tmp_path / "b.pth")
    (tmp_path / "c.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a PyTorch"):
        load_backbone_weights(module, tmp_path / "c.pth")
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(module, tmp_path / "missing.pth")


def test_efficientnet_lite0_package_mapping_is_complete(tmp_path):
    mapped = efficientnet_lite0_package_state_dict()
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert list(mapped) == list(reference)
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    path = tmp_path / "lite0.pth"
    torch.save(mapped, path)
    backbone = Backbone("efficientnet_lite0", [0, 1, 2, 3], pretrained_path=str(path))
    assert backbone.load_report.missing == [] and backbone.load_report.mismatched == []
    assert {k.split(".")[0] for k in backbone.load_report.unexpected} == {"conv_head", "bn2",
                                                                            "classifier"}


def test_efficientnet_lite0_package_weights_classify_real_images(coco128):
    """Optional sanity check: the mapped ImageNet weights recognise COCO content."""
    from torchvision.io import read_image
    from torchvision.transforms.functional import normalize, resize
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(efficientnet_lite0_package_state_dict(), strict=True)
    # 000000000030: a vase of flowers (ImageNet 738 "pot"); 000000000009: food with broccoli (937).
    for image_id, label in (("000000000030", 738), ("000000000009", 937)):
        image = read_image(str(coco128 / "images" / f"{image_id}.jpg")).float() / 255
        x = normalize(resize(image, [224, 224], antialias=True), [0.5] * 3, [0.5] * 3)
        with torch.no_grad():
            top5 = model(x[None]).topk(5).indices[0].tolist()
        assert label in top5, (image_id, top5)
