"""Eval-time folding (codetr.model.eval_fold): outputs unchanged, training refused.

Reference: the same module before folding. Random weights AND non-trivial BatchNorm statistics
(running mean ~N(0, 1), variance in [0.5, 2], affine weight ~N(1, 0.2), bias ~N(0, 1)), fresh
random inputs different from the fold's probe. Tolerance 1e-5 (the issue's bar): folding
reorders fp32 products (w * s instead of (x * w) * s), a relative change of a few ulp per layer.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from codetr.model.backbone import Backbone
from codetr.model.builder import build_model
from codetr.model.deformable_attention import MultiScaleDeformableAttention
from codetr.model.eval_fold import FoldedBatchNorm, fold_batch_norms, fold_for_eval
from codetr.spec import load_spec
from tests.tiny_detector import TINY_HEAD, fixed_batch


def randomise_batch_norms(module: nn.Module) -> int:
    """Non-trivial eval statistics and affine parameters on every BatchNorm; returns their count."""
    count = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_()
                count += 1
    return count


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / (1 + y.abs().max())) for x, y in zip(a, b))


@pytest.mark.parametrize("name,timm_name", [("resnet_50", "resnet18"), ("efficientnet_lite0", None)])
def test_folded_trunk_gives_the_same_features(name, timm_name):
    torch.manual_seed(0)
    backbone = Backbone(name, [1, 2, 3], timm_name=timm_name).eval()
    num_bn = randomise_batch_norms(backbone)
    images = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        before = backbone(images)
    folded = fold_batch_norms(backbone, torch.randn(1, 3, 64, 64))
    assert folded == num_bn > 0  # every BatchNorm of these trunks follows a convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    with torch.no_grad():
        after = backbone(images)
    assert max_rel_diff(after, before) < 1e-5
    with pytest.raises(RuntimeError, match="folded for evaluation"):
        backbone.train()


class SharedConvOutput(nn.Module):
    """A conv output feeding a BatchNorm AND a residual: folding it would change the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_used_twice_is_left_unfolded():
    torch.manual_seed(0)
    module = SharedConvOutput().eval()
    randomise_batch_norms(module)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = module(x)
    assert fold_batch_norms(module, torch.randn(1, 3, 8, 8)) == 0
    assert isinstance(module.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(module(x), before)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet_50"])
def test_folded_detector_gives_the_same_predictions(backbone):
    torch.manual_seed(0)
    spec = load_spec(None, TINY_HEAD + [f"model.backbone={backbone}", "model.pretrained_backbone_path=null"])
    model = build_model(spec, num_classes=3, load_pretrained_backbone=False).eval()
    randomise_batch_norms(model)
    with torch.no_grad():  # the offsets and attention projections: non-zero, so fusion matters
        for m in model.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                for lin in (m.sampling_offsets, m.attention_weights):
                    lin.weight.normal_(0, 0.05)
    images, masks, _ = fixed_batch()
    with torch.no_grad():
        before = model(images, masks)
    counts = fold_for_eval(model)
    assert counts["batch_norms"] > 0 and counts["projections"] == 2  # 1 encoder + 1 decoder layer
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    with torch.no_grad():
        after = model(images, masks)
    for key in ("pred_logits", "pred_boxes"):
        assert max_rel_diff([after[key]], [before[key]]) < 1e-5, key
    assert not any("fused" in k for k in model.state_dict())


def test_training_drops_the_fused_projections():
    attn = MultiScaleDeformableAttention(32, 2, 3, 2).eval()
    attn.fuse_query_projections()
    assert attn.fused_query_weight.shape == (2 * 3 * 2 * 3, 32)
    attn.train()
    assert attn.fused_query_weight is None and attn.fused_query_bias is None
    assert isinstance(FoldedBatchNorm().eval(), FoldedBatchNorm)
