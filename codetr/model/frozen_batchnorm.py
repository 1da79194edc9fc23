"""Frozen BatchNorm of a CNN trunk: statistics and affine fixed, in training too.

What the official Co-DINO / Co-Deformable-DETR ResNet recipes train with (mmdet's
`norm_cfg=dict(type='BN', requires_grad=False)` + `norm_eval=True`; DETR's and HF's
`FrozenBatchNorm2d`): the running mean and variance of the pretrained weights stay as they are,
and gamma / beta get no gradient. The modules stay `nn.BatchNorm2d` (same state dict, same
eval-time folding); they are kept in eval mode by the trunk's `train()` and their parameters
have `requires_grad=False`, so the optimizer never sees them.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm (1d/2d/3d, SyncBatchNorm) under `module`, in module order."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def freeze_batchnorm(module: nn.Module) -> int:
    """Freezes every BatchNorm under `module` (no gradient, eval mode); returns how many."""
    layers = batchnorm_layers(module)
    for layer in layers:
        layer.requires_grad_(False)
        layer.eval()
    return len(layers)


def keep_batchnorm_eval(module: nn.Module) -> None:
    """Puts every BatchNorm under `module` back in eval mode (call after `module.train()`)."""
    for layer in batchnorm_layers(module):
        layer.eval()
