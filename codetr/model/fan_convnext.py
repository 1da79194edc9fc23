"""The convolutional front of the hybrid FAN backbones: a two-stage ConvNeXt.

FAN's hybrid variants (Zhou et al. 2022, "Understanding The Robustness in Vision Transformers")
replace the ViT patch embedding with the first two stages of a ConvNeXt (Liu et al. 2022):
a 4x4 stride-4 stem, stage 0 at stride 4 with 128 channels, stage 1 at stride 8 with 256
channels. Parameter names follow timm's ConvNeXt (``stem.0``, ``stages.1.downsample.1``,
``stages.0.blocks.2.conv_dw``, ``mlp.fc1`` as 1x1 convs, ``gamma``), which is the layout of NVIDIA
TAO's FAN checkpoints under ``patch_embed.backbone.``.
"""
import torch
from torch import Tensor, nn
from timm.layers import DropPath, LayerNorm2d, trunc_normal_


class ConvMlp(nn.Module):
    """1x1 conv (``fc1``, ``ratio`` x wider) -> GELU -> 1x1 conv (``fc2``), keeping NCHW."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, ratio * dim, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(ratio * dim, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, dim, H, W]`` -> same shape."""
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm2d -> 1x1 conv (4x) -> GELU -> 1x1 conv, layer-scaled residual.

    Args:
        dim: channels.
        drop_path: stochastic depth of the residual branch (training only).
        layer_scale_init: initial value of the per-channel ``gamma`` (ConvNeXt's 1e-6).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.mlp = ConvMlp(dim)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``[B, dim, H, W]`` -> same shape."""
        y = self.mlp(self.norm(self.conv_dw(x)))
        return x + self.drop_path(y * self.gamma.reshape(1, -1, 1, 1))


class ConvNeXtStage(nn.Module):
    """Optional LayerNorm2d + strided conv downsampling, then ``depth`` ConvNeXt blocks."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, depth: int) -> None:
        super().__init__()
        if stride > 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_channels, eps=1e-6),
                nn.Conv2d(in_channels, out_channels, kernel_size=stride, stride=stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_channels) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in, H, W]`` -> ``[B, out, H / stride, W / stride]``."""
        return self.blocks(self.downsample(x))


class ConvNeXtFront(nn.Module):
    """Stem (4x4 conv, stride 4, + LayerNorm2d) and ConvNeXt stages.

    Args:
        depths: blocks per stage; FAN-hybrid uses two stages ([3, 3]; [3, 5] for the large size).
        dims: channels per stage (FAN-hybrid: 128, 256).

    Attributes:
        out_channels: channels after each stage.
        strides: stride of each stage's output (4, 8, ...).
    """

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
                                  LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*[
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], 2 if i else 1, depth)
            for i, depth in enumerate(depths)])
        self.out_channels = list(dims[: len(depths)])
        self.strides = [4 * 2 ** i for i in range(len(depths))]
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` (H, W multiples of 4 * 2^(stages-1)) -> one map per stage, finest first."""
        x = self.stem(images)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def _init_weights(module: nn.Module) -> None:
    # ConvNeXt's initialisation: truncated normal (std 0.02) weights, zero biases.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
