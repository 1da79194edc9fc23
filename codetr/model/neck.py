"""ChannelMapper neck: project every backbone level to the transformer width, add extra levels."""
from torch import Tensor, nn


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups`` (32 for 256 channels)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class ConvGN(nn.Module):
    """Conv2d without bias followed by GroupNorm, no activation (mmdet's ``ConvModule`` naming)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(group_norm_groups(out_channels), out_channels)
        # DINO initialises its input projections with Xavier; GN follows so the scale is moot.
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C_in, H, W]`` -> ``[B, C_out, ceil(H / stride), ceil(W / stride)]``."""
        return self.gn(self.conv(x))


class ChannelMapper(nn.Module):
    """Per-level Conv1x1 + GroupNorm, then ``num_extra_levels`` Conv3x3 stride-2 + GN levels.

    The first extra level is computed from the RAW last backbone feature (as mmdet's
    ``ChannelMapper`` and DINO's ``input_proj`` do), each further one from the previous extra
    output. Parameter names (``convs.{i}.conv|gn``, ``extra_convs.{j}.conv|gn``) mirror mmdet's
    ``neck.convs.{i}.conv|gn`` so official checkpoints map over by prefix.

    Args:
        in_channels: channels of each backbone level, finest first.
        out_channels: channels of every output level (the transformer's hidden_dim).
        num_extra_levels: stride-2 levels to add after the last backbone level.
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_extra_levels: int) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("ChannelMapper needs at least one input level")
        if num_extra_levels < 0:
            raise ValueError(f"num_extra_levels must be >= 0, got {num_extra_levels}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_extra_levels = num_extra_levels
        self.convs = nn.ModuleList(ConvGN(c, out_channels, 1, 1) for c in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_extra_levels - 1)
        self.extra_convs = nn.ModuleList(ConvGN(c, out_channels, 3, 2)
                                         for c in extra_in[:num_extra_levels])

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Map the backbone levels.

        Args:
            features: ``len(in_channels)`` tensors ``[B, in_channels[i], H_i, W_i]``, finest first.

        Returns:
            ``len(in_channels) + num_extra_levels`` tensors ``[B, out_channels, H_l, W_l]``; the
            extra levels have ``H_{l+1} = ceil(H_l / 2)``.
        """
        if len(features) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} feature levels, got {len(features)}")
        outs = [conv(f) for conv, f in zip(self.convs, features)]
        previous = features[-1]
        for extra in self.extra_convs:
            previous = extra(previous)
            outs.append(previous)
        return outs
