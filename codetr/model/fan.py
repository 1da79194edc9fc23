"""Hybrid FAN backbones (``fan_tiny|small|base|large``) as NVIDIA uses them in its DETR family.

A two-stage ConvNeXt (``fan_convnext.py``) gives strides 4 and 8; a 2x2 stride-2 conv turns
stride 8 into stride-16 tokens for the FAN blocks (``fan_blocks.py``). The output of block
``out_block`` is the stride-16 level; all blocks, then two class-attention blocks, then a 3x3
stride-2 conv to 768 channels give the stride-32 level. Each returned level passes its own
LayerNorm (``out_norm{slot}``). Sizes are those of TAO's DINO / Deformable-DETR FAN
(``fan_tiny_8_p4_hybrid``, ``fan_small_12_p4_hybrid``, ``fan_base_12_p4_hybrid``,
``fan_large_12_p4_hybrid``, also detrex's), module names those of TAO's FAN, so TAO/NGC FAN
checkpoints load by name (see :meth:`FAN.adapt_state_dict` and the README's key map).
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.model.fan_blocks import ClassAttentionBlock, DWConv, FANBlock, PositionalEncodingFourier
from codetr.model.fan_convnext import ConvNeXtFront

CONV_DIMS = (128, 256)  # channels of the ConvNeXt stages (strides 4, 8)
LAST_CHANNELS = 768     # channels of the stride-32 level (``learnable_downsample``)
TOKEN_STRIDE = 16


@dataclass(frozen=True)
class FANArch:
    """One FAN-hybrid size.

    Attributes:
        embed_dim: token width (channels of the stride-16 level).
        depth: FAN blocks.
        num_heads: attention heads.
        conv_depths: ConvNeXt blocks per stage.
        out_block: index of the block whose output is the stride-16 level (TAO takes block 18
            of the large size's 22; the later blocks still feed the stride-32 level).
    """

    embed_dim: int
    depth: int
    num_heads: int
    conv_depths: tuple[int, int]
    out_block: int


FAN_ARCHS = {
    "fan_tiny": FANArch(192, 8, 8, (3, 3), 7),
    "fan_small": FANArch(384, 10, 8, (3, 3), 9),
    "fan_base": FANArch(448, 16, 8, (3, 3), 15),
    "fan_large": FANArch(480, 22, 10, (3, 5), 18),
}


class HybridEmbed(nn.Module):
    """ConvNeXt stages (``backbone``) then a 2x2 stride-2 conv (``proj``) to the token width."""

    def __init__(self, conv_depths: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.backbone = ConvNeXtFront(conv_depths, CONV_DIMS)
        self.proj = nn.Conv2d(CONV_DIMS[-1], embed_dim, kernel_size=2, stride=2)

    def forward(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """``[B, 3, H, W]`` (multiples of 16) -> (the conv maps at strides 4 and 8, the
        ``[B, D, H / 16, W / 16]`` token grid)."""
        maps = self.backbone(images)
        return maps, self.proj(maps[-1])


class FAN(nn.Module):
    """FAN-hybrid trunk returning NCHW pyramid levels (slots 0..3 = strides 4, 8, 16, 32).

    Args:
        arch: the size (``FAN_ARCHS[name]``).
        out_indices: ascending slots to return, within 0..3.
        drop_path_rate: stochastic depth of every FAN block (TAO uses the same 0.3 for all).
        activation_checkpoint: recompute each FAN block in backward (training only).

    Attributes:
        out_channels: channels per returned level (e.g. fan_tiny: 128, 256, 192, 768).
        strides: stride per returned level.
    """

    def __init__(self, arch: FANArch, out_indices: tuple[int, ...] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.3, activation_checkpoint: bool = False) -> None:
        super().__init__()
        if not out_indices or list(out_indices) != sorted(set(out_indices)) \
                or not 0 <= out_indices[0] <= out_indices[-1] <= 3:
            raise ValueError(f"FAN out_indices must be ascending slots within 0..3, got {out_indices}")
        dim = arch.embed_dim
        self.arch = arch
        self.out_indices = tuple(out_indices)
        self.activation_checkpoint = activation_checkpoint
        self.patch_embed = HybridEmbed(arch.conv_depths, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = PositionalEncodingFourier(dim)
        self.blocks = nn.ModuleList(FANBlock(dim, arch.num_heads, drop_path=drop_path_rate)
                                    for _ in range(arch.depth))
        self.cls_attn_blocks = nn.ModuleList(ClassAttentionBlock(dim, arch.num_heads)
                                             for _ in range(2))
        all_channels = [*CONV_DIMS, dim, LAST_CHANNELS]
        for slot in self.out_indices:
            self.add_module(f"out_norm{slot}", nn.LayerNorm(all_channels[slot]))
        self.learnable_downsample = nn.Conv2d(dim, LAST_CHANNELS, 3, stride=2, padding=1)
        self.out_channels = [all_channels[s] for s in self.out_indices]
        self.strides = [4 * 2 ** s for s in self.out_indices]
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("patch_embed."):
                continue  # the ConvNeXt front initialised itself
            _init_weights(module)

    def _run_block(self, block: FANBlock, x: Tensor, height: int, width: int) -> Tensor:
        if self.activation_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, height, width, use_reentrant=False)
        return block(x, height, width)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Extract the requested levels.

        Args:
            images: float ``[B, 3, H, W]``; any size: it is zero-padded at the bottom/right to a
                multiple of 16 and the levels are cropped back.

        Returns:
            One ``[B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i])]`` tensor per
            slot of ``out_indices``, finest first.
        """
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % TOKEN_STRIDE, -width % TOKEN_STRIDE
        x = F.pad(images, (0, pad_w, 0, pad_h))
        last = self.out_indices[-1]
        levels, grid = self.patch_embed(x)
        if last >= 2:
            b, dim, gh, gw = grid.shape
            grid = grid + self.pos_embed(gh, gw)
            tokens = grid.flatten(2).transpose(1, 2)  # [B, gh * gw, D]
            stop = self.arch.out_block + 1 if last == 2 else len(self.blocks)
            for index, block in enumerate(self.blocks[:stop]):
                tokens = self._run_block(block, tokens, gh, gw)
                if index == self.arch.out_block:
                    levels.append(tokens.transpose(1, 2).reshape(b, dim, gh, gw))
            if last == 3:
                tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
                for block in self.cls_attn_blocks:
                    tokens = block(tokens)
                patches = tokens[:, 1:].transpose(1, 2).reshape(b, dim, gh, gw)
                levels.append(self.learnable_downsample(patches))
        outs = []
        for slot in self.out_indices:
            norm = getattr(self, f"out_norm{slot}")
            level = norm(levels[slot].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            stride = 4 * 2 ** slot
            outs.append(level[..., : math.ceil(height / stride), : math.ceil(width / stride)])
        return outs

    @staticmethod
    def adapt_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """TAO/NGC FAN checkpoint names -> this module's names.

        Identity for current TAO checkpoints, except: a TAO DINO model's ``backbone.0.body.``
        prefix is dropped; the old ``pos_embeder.`` spelling becomes ``pos_embed.``; a fused
        class-attention ``attn.qkv`` (the original FAN release) is split into ``q``, ``k``,
        ``v``. Classifier tensors (``head.*``, ``norm.*``) pass through and are reported
        unexpected by the loader.
        """
        out: dict[str, Tensor] = {}
        for key, tensor in state_dict.items():
            key = re.sub(r"^(?:.*\.)?backbone\.0\.body\.", "", key)
            key = key.replace("pos_embeder.", "pos_embed.")
            fused = re.match(r"^(.*cls_attn_blocks\.\d+\.attn\.)qkv\.(weight|bias)$", key)
            if fused:
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                    out[f"{fused.group(1)}{part}.{fused.group(2)}"] = chunk
            else:
                out[key] = tensor
        return out


def _init_weights(module: nn.Module) -> None:
    # TAO FAN's initialisation: truncated-normal linears, unit LayerNorms, He-normal (fan-out)
    # depthwise convs; the remaining convs keep PyTorch's default.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, DWConv):
        for conv in (module.conv1, module.conv2):
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(conv.bias)


def build_fan(name: str, out_indices: tuple[int, ...], drop_path_rate: float = 0.3,
              activation_checkpoint: bool = False) -> FAN:
    """The FAN-hybrid trunk of a spec name (``fan_tiny`` ... ``fan_large``)."""
    if name not in FAN_ARCHS:
        raise ValueError(f"unknown FAN backbone {name!r}; choose one of {', '.join(FAN_ARCHS)}")
    return FAN(FAN_ARCHS[name], out_indices, drop_path_rate, activation_checkpoint)
