"""EfficientViT b0..b3 (timm, MIT-Han-Lab's B series): build, strides/channels, training steps."""
import math

import pytest
import torch

from codetr.model.backbone import Backbone
from tiny_detector import loss_fell, train_losses

# Stage widths of the EfficientViT B series (Cai et al. 2023, Table "width"): the C2..C5 levels.
WIDTHS = {"efficientvit_b0": [16, 32, 64, 128], "efficientvit_b1": [32, 64, 128, 256],
          "efficientvit_b2": [48, 96, 192, 384], "efficientvit_b3": [64, 128, 256, 512]}


@pytest.mark.parametrize("name", list(WIDTHS))
def test_builds_with_the_b_series_strides_and_channels(name):
    torch.manual_seed(0)
    backbone = Backbone(name, [0, 1, 2, 3]).eval()
    assert backbone.out_channels == WIDTHS[name]
    assert backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 100, 150))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, math.ceil(100 / s), math.ceil(150 / s)) for c, s in zip(WIDTHS[name], [4, 8, 16, 32])]


@pytest.mark.parametrize("name", list(WIDTHS))
def test_tiny_codetr_trains_a_few_steps(name):
    losses = train_losses([f"model.backbone={name}"], steps=8)
    assert all(math.isfinite(v) for v in losses)
    assert loss_fell(losses), losses
