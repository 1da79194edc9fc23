"""ViT-L/14 backbones (vit_large_codetr / _dinov2 / _nvdinov2) at the real size, in Co-DETR's
ViT-L setting: simple feature pyramid over 5 levels, 1536 crop, layer decay, checkpointing."""
import math

import pytest
import torch

from codetr.model.backbone import TIMM_NAMES, Backbone
from codetr.model.builder import build_model
from codetr.spec import load_spec
from codetr.tasks.optim import build_param_groups

VIT_NAMES = ["vit_large_codetr", "vit_large_dinov2", "vit_large_nvdinov2"]
DEPTH, DIM, PATCH, GRID = 24, 1024, 14, 37  # ViT-L/14, pretrained at 518 px = 37 x 37 patches

# The model block of TAO Co-DETR's ViT-L spec (seed 000) and its 1536 px LSJ crop.
SEED_VIT_SPEC = [
    "model.backbone=vit_large_codetr", "model.num_queries=1500", "model.num_feature_levels=5",
    "model.return_interm_indices=[0,1,2,3,4]", "model.two_stage_type=standard",
    "model.num_co_heads=2", "model.co_head_num_convs=1", "model.num_select=1000",
    "dataset.augmentation.fixed_random_crop=1536", "train.activation_checkpoint=true",
    "train.optim.layer_decay_rate=0.65", "train.optim.lr_backbone=2e-5",
]


def dinov2_vitl14_state_dict(swiglu: bool = False):
    """Random tensors under the public DINOv2 ViT-L/14 checkpoint's names and shapes
    (facebookresearch/dinov2 ``dinov2_vitl14_pretrain.pth``: ``DinoVisionTransformer`` with
    ``block_chunks=0``, LayerScale ``ls1``/``ls2``, a ``mask_token``, no head).

    ``swiglu``: NV-DINOv2's MLP instead (TAO ``vit_large_patch14_dinov2_swiglu``, a timm
    VisionTransformer with ``SwiGLUPacked``, ``mlp_ratio=5472/1024``): ``mlp.fc1`` 1024 -> 5472,
    ``mlp.fc2`` 2736 -> 1024."""
    g = torch.Generator().manual_seed(0)
    hidden, gated = (5472, 2736) if swiglu else (4 * DIM, 4 * DIM)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"cls_token": rand(1, 1, DIM), "pos_embed": rand(1, 1 + GRID * GRID, DIM),
          "mask_token": rand(1, DIM), "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH),
          "patch_embed.proj.bias": rand(DIM), "norm.weight": rand(DIM), "norm.bias": rand(DIM)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": rand(DIM), b + "norm1.bias": rand(DIM),
                   b + "attn.qkv.weight": rand(3 * DIM, DIM), b + "attn.qkv.bias": rand(3 * DIM),
                   b + "attn.proj.weight": rand(DIM, DIM), b + "attn.proj.bias": rand(DIM),
                   b + "ls1.gamma": rand(DIM), b + "norm2.weight": rand(DIM),
                   b + "norm2.bias": rand(DIM), b + "mlp.fc1.weight": rand(hidden, DIM),
                   b + "mlp.fc1.bias": rand(hidden), b + "mlp.fc2.weight": rand(DIM, gated),
                   b + "mlp.fc2.bias": rand(DIM), b + "ls2.gamma": rand(DIM)})
    return sd


def test_the_three_names_are_vit_l14_and_nvdinov2_has_taos_swiglu_mlp():
    assert {TIMM_NAMES[n] for n in VIT_NAMES} == {"vit_large_patch14_dinov2"}
    for name in VIT_NAMES:
        with torch.device("meta"):
            body = Backbone(name, [2, 3]).body
        shapes = {k: tuple(v.shape) for k, v in body.state_dict().items()}
        expected = {k: tuple(v.shape) for k, v in
                    dinov2_vitl14_state_dict(swiglu=name == "vit_large_nvdinov2").items()
                    if k != "mask_token"}
        assert shapes == expected, name
        assert 300e6 < sum(p.numel() for p in body.parameters()) < 306e6


def test_seed_vit_l_model_structure_and_layer_decay():
    """The seed's ViT-L Co-DETR, built on the meta device: ~304M-parameter trunk (DINOv2 paper:
    ViT-L/14 "300M"), 5 SFP levels at strides 4..64, 256 channels, checkpointing on, and the
    backbone learning rate decayed by 0.65 per block from the top."""
    spec = load_spec(None, SEED_VIT_SPEC)
    with torch.device("meta"):
        model = build_model(spec, num_classes=80, load_pretrained_backbone=False)
    backbone = model.backbone
    trunk = sum(p.numel() for p in backbone.body.parameters())
    assert 300e6 < trunk < 305e6, trunk
    assert len(backbone.body.blocks) == DEPTH and backbone.body.embed_dim == DIM
    assert backbone.body.grad_checkpointing
    assert backbone.strides == [4, 8, 16, 32, 64] and backbone.out_channels == [256] * 5
    assert set(backbone.pyramid.levels) == {"p2", "p3", "p4", "p5"}  # p6 pools p5's output
    crop = spec.dataset.augmentation.fixed_random_crop
    with torch.device("meta"), torch.no_grad():  # shapes of the 1536 crop, no compute
        outs = backbone.eval()(torch.empty(1, 3, crop, crop))
    assert [tuple(o.shape) for o in outs] == [(1, 256, crop // s, crop // s) for s in (4, 8, 16, 32, 64)]
    groups = {g["name"]: g for g in build_param_groups(model, spec.train.optim, vit_layer_decay=True)}
    lr_of = {id(p): g["lr"] for g in groups.values() for p in g["params"]}
    named = dict(model.named_parameters())
    base = spec.train.optim.lr_backbone
    for name, layer in [("backbone.body.patch_embed.proj.weight", 0),
                        ("backbone.body.blocks.0.attn.qkv.weight", 1),
                        ("backbone.body.blocks.23.mlp.fc2.weight", DEPTH),
                        ("backbone.body.norm.weight", DEPTH + 1)]:
        assert math.isclose(lr_of[id(named[name])], base * 0.65 ** (DEPTH + 1 - layer)), name
    assert lr_of[id(named["backbone.pyramid.levels.p2.lateral.0.weight"])] == spec.train.optim.lr


@pytest.mark.slow
@pytest.mark.parametrize("name", VIT_NAMES)
def test_real_size_vit_l_loads_dinov2_weights_and_trains(name, tmp_path):
    """Real ViT-L/14 on the CPU: a DINOv2-format file (NV-DINOv2's SwiGLU shapes for
    vit_large_nvdinov2) loads completely (only ``mask_token``, a pretraining-only tensor, is left
    over), then forward + backward through 5 levels with activation checkpointing."""
    torch.manual_seed(0)
    path = tmp_path / "dinov2_vitl14.pth"
    source = dinov2_vitl14_state_dict(swiglu=name == "vit_large_nvdinov2")
    torch.save(source, path)
    backbone = Backbone(name, [0, 1, 2, 3, 4], pretrained_path=str(path),
                        activation_checkpoint=True).train()
    report = backbone.load_report
    assert report.missing == [] and report.mismatched == [] and report.unexpected == ["mask_token"]
    assert len(report.loaded) == len(source) - 1
    loaded = backbone.body.state_dict()
    for key in ("pos_embed", "blocks.11.attn.qkv.weight", "blocks.23.ls2.gamma"):
        assert torch.equal(loaded[key], source[key]), key
    images = torch.randn(1, 3, 64, 96)
    outs = backbone(images)
    assert [tuple(o.shape) for o in outs] == [
        (1, 256, math.ceil(64 / s), math.ceil(96 / s)) for s in (4, 8, 16, 32, 64)]
    sum(o.mean() for o in outs).backward()
    assert backbone.body.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert backbone.pyramid.levels["p2"].lateral[0].weight.grad.abs().sum() > 0


def test_activation_checkpointing_keeps_the_gradients():
    """Checkpointed ViT blocks (small DINOv2 member, same code path) give the same gradients."""
    torch.manual_seed(0)
    plain = Backbone("vit_large_dinov2", [1, 2, 3], pyramid_channels=16,
                     timm_name="vit_small_patch14_dinov2").train()
    ckpt = Backbone("vit_large_dinov2", [1, 2, 3], pyramid_channels=16,
                    timm_name="vit_small_patch14_dinov2", activation_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.body.grad_checkpointing and not plain.body.grad_checkpointing
    images = torch.randn(1, 3, 48, 64)
    for model in (plain, ckpt):
        sum(o.sum() for o in model(images)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_vit_large_codetr_follows_an_nvdinov2_file(tmp_path):
    """TAO builds vit_large_codetr from NV-DINOv2 or DINOv2 weights: given an NV-DINOv2-format
    file, the name takes the SwiGLU MLP and loads it completely."""
    path = tmp_path / "nvdinov2_vitl14.pth"
    torch.save(dinov2_vitl14_state_dict(swiglu=True), path)
    backbone = Backbone("vit_large_codetr", [2, 3], pretrained_path=str(path))
    report = backbone.load_report
    assert report.missing == [] and report.mismatched == [] and report.unexpected == ["mask_token"]
    assert tuple(backbone.body.blocks[0].mlp.fc2.weight.shape) == (1024, 2736)


def test_vit_large_codetr_restores_with_the_mlp_of_its_trained_weights():
    """A restored model has no pretrained file to look at: its own weights say which MLP it has
    (the bug: an NV-DINOv2 vit_large_codetr could not be evaluated after training)."""
    for fc1_out, fc2_in in ((5472, 2736), (4096, 4096)):  # NV-DINOv2's SwiGLU, DINOv2's MLP
        state = {"backbone.body.blocks.0.mlp.fc1.weight": torch.empty(fc1_out, DIM, device="meta")}
        with torch.device("meta"):
            backbone = Backbone("vit_large_codetr", [2, 3], variant_state=state)
        assert backbone.body.blocks[0].mlp.fc2.weight.shape[1] == fc2_in
