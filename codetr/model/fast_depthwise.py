"""The CNN trunks' depthwise convolutions, trained with `codetr.ops.depthwise_conv`.

`fast_depthwise(module)` swaps every depthwise `nn.Conv2d` (groups == in == out channels, zero
padding) and timm `Conv2dSame` inside `module` for `DepthwiseConv2d`, which holds the SAME
parameter objects under the same names (state dict keys and loading are unchanged) and computes
the same forward values; only the weight gradient of the shapes where oneDNN's is slow takes the
transposed route (`transposed_weight_grad_applies`). Measured on the default model's training step
in BENCHMARKS.md ("Training step cost", `bench/step_profile.py`).
"""
from __future__ import annotations

from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn

from codetr.ops.depthwise_conv import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise `nn.Conv2d` (or TF-"same"-padded timm `Conv2dSame` when `same_pad`)."""

    same_pad: bool = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A `DepthwiseConv2d` sharing `conv`'s parameters (no copy) and configuration."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "transposed", "output_padding", "groups", "padding_mode"):
            setattr(new, name, getattr(conv, name))
        if hasattr(conv, "_reversed_padding_repeated_twice"):
            new._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        new.weight = conv.weight
        new.register_parameter("bias", conv.bias)  # None stays a None parameter entry
        new.same_pad = isinstance(conv, Conv2dSame)
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C, H, W]` -> `[B, C, Ho, Wo]`, the values of the convolution it replaced."""
        if self.same_pad:
            x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
            return depthwise_conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation)
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                self.dilation)


def is_swappable(conv: nn.Module) -> bool:
    """A depthwise conv `DepthwiseConv2d` reproduces exactly (plain or timm same-padded)."""
    if type(conv) not in (nn.Conv2d, Conv2dSame):
        return False
    return (conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def fast_depthwise(module: nn.Module) -> int:
    """Swaps every depthwise conv of `module` for a `DepthwiseConv2d`; returns how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_swappable(child):
                setattr(parent, name, DepthwiseConv2d.from_conv(child))
                swapped += 1
    return swapped
