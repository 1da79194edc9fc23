"""model.backbone_frozen_bn: the official ResNet recipes' frozen BatchNorm (mmdet's norm_eval=True
with BN requires_grad=False), and their frozen_stages=1 through train.freeze."""
from pathlib import Path

import pytest
import torch
from torch import nn

from codetr.model.backbone import Backbone
from codetr.spec import SpecError, load_spec
from codetr.tasks.optim import build_param_groups, freeze_parameters
from tests.zoo_fixtures import tiny_model

H, W = 64, 96
RECIPES = Path(__file__).resolve().parents[1] / "params"


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name, layer in module.named_modules()
            if isinstance(layer, nn.BatchNorm2d) for key, value in layer.state_dict().items()}


def _pretrained_like(backbone: Backbone) -> Backbone:
    """Random BN statistics and affine, as pretrained weights have (timm zero-inits some gammas)."""
    for bn in (m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return backbone


def _train_step(backbone: Backbone, images: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    sum((level * torch.randn_like(level)).sum() for level in backbone(images)).backward()
    optimizer.step()


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_statistics_and_affine_stay_convolutions_train(frozen_bn):
    torch.manual_seed(0)
    backbone = _pretrained_like(Backbone("resnet_18", [1, 2, 3], frozen_bn=frozen_bn)).train()
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(type(bn) is nn.BatchNorm2d for bn in bns)  # same modules, same keys
    assert all(bn.training != frozen_bn for bn in bns)
    assert all(p.requires_grad != frozen_bn for bn in bns for p in bn.parameters())
    before, conv = _bn_state(backbone.body), backbone.body.layer2[0].conv1.weight.clone()
    _train_step(backbone, torch.randn(2, 3, H, W))
    after = _bn_state(backbone.body)
    assert len(before) == 20 * 5  # weight, bias, running_mean, running_var, num_batches_tracked
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == [] if frozen_bn else len(changed) == len(before)
    assert not torch.equal(conv, backbone.body.layer2[0].conv1.weight)  # the convolutions learn


def test_training_mode_computes_what_eval_mode_computes():
    """Frozen BN normalises with the running statistics in training too (mmdet's norm_eval)."""
    torch.manual_seed(0)
    backbone = _pretrained_like(Backbone("resnet_18", [1, 2, 3], frozen_bn=True))
    images = torch.randn(2, 3, H, W)
    with torch.no_grad():
        trained = backbone.train()(images)
        evaluated = backbone.eval()(images)
    for a, b in zip(trained, evaluated):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_trunk_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        Backbone("swin_tiny_224_1k", [1, 2, 3], frozen_bn=True)
    with pytest.raises(SpecError, match=r"model.backbone_frozen_bn=true .* model.backbone=swin_tiny_224_1k has none"):
        load_spec(str(RECIPES / "co_dino_5scale_swin_l_1x.yaml"),
                  ["model.backbone=swin_tiny_224_1k", "model.backbone_frozen_bn=true"])


def test_the_optimizer_gets_no_batchnorm_parameter():
    model = tiny_model(backbone_frozen_bn=True)
    spec = load_spec(str(RECIPES / "co_dino_5scale_r50_1x.yaml"), [])
    trained = {id(p) for g in build_param_groups(model, spec.train.optim) for p in g["params"]}
    bn_params = [p for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)
                 for p in m.parameters()]
    assert bn_params and not any(id(p) in trained for p in bn_params)
    assert id(model.backbone.body.layer1[0].conv1.weight) in trained


def test_the_official_resnet_recipes_freeze_what_mmdet_freezes():
    """frozen_stages=1 + frozen BN: the stem and stage 1 entirely, every BN; stages 2-4 convs train."""
    recipes = sorted(RECIPES.glob("co_dino_5scale_r50*.yaml")) + [
        RECIPES / "co_deformable_detr_r50_1x.yaml", RECIPES / "coco-r50.yaml"]
    assert len(recipes) == 5
    model = tiny_model(backbone_frozen_bn=True)  # resnet_18: the same names as resnet_50
    for path in recipes:
        spec = load_spec(str(path), [])
        assert spec.model.backbone == "resnet_50" and spec.model.backbone_frozen_bn, path
        assert spec.train.freeze == ["backbone.body.conv1", "backbone.body.layer1"], path
    freeze_parameters(model, spec.train.freeze)
    trainable = {name for name, p in model.backbone.body.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.backbone.body.named_parameters()
                if name.split(".")[0] in ("layer2", "layer3", "layer4") and ".bn" not in name
                and "downsample.1" not in name}
    assert trainable == expected and len(expected) == 3 * 5  # conv1, conv2, conv1, conv2, downsample
    for path in sorted(RECIPES.glob("co_dino_5scale_swin*.yaml")):
        spec = load_spec(str(path), [])
        assert not spec.model.backbone_frozen_bn and spec.train.freeze == [], path
