"""Swin Transformer backbone that behaves like MMDetection's ``SwinTransformer``.

The official Co-DINO Swin checkpoints were trained with mmdet's Swin; this module reproduces its
forward (checked against ../shared/reference/mmdet-codino ``swin_*``, see ``tests/test_swin.py``)
and its parameter names, so a checkpoint's ``backbone.X`` loads 1:1 into ``Backbone.body.X``:

    patch_embed.projection.*  patch_embed.norm.*
    stages.i.blocks.j.{norm1, attn.w_msa.{relative_position_bias_table, relative_position_index,
                       qkv, proj}, norm2, ffn.layers.0.0 (fc1), ffn.layers.1 (fc2)}
    stages.i.downsample.{norm, reduction}   (i < 3)
    norm{i}                                  (one LayerNorm per returned stage i)

What differs from timm's Swin: per-level output norms; patch merging in ``nn.Unfold`` channel
order (channel c of patch offset (kh, kw) at ``4c + 2kh + kw``); pad-then-roll and always-shift
window attention (``swin_attention.py``); inputs of any size, zero-padded at the bottom/right to
the patch and window sizes, outputs ``ceil(H / stride)``.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.model.swin_attention import ShiftWindowMSA, shift_attention_mask
from codetr.model.swin_weights import to_mmdet_swin_state_dict


@dataclass(frozen=True)
class SwinArch:
    """Width and depth of a Swin size (the Swin paper's T/B/L)."""
    embed_dims: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]


SWIN_ARCHS = {
    "tiny": SwinArch(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "base": SwinArch(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": SwinArch(192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


class PatchEmbed(nn.Module):
    """Zero-pad to a multiple of the patch (bottom/right), stride-``patch`` conv, LayerNorm."""

    def __init__(self, in_channels: int, embed_dims: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.projection = nn.Conv2d(in_channels, embed_dims, patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[B, 3, H, W]`` -> (``[B, H' * W', C]`` row-major tokens, ``(H', W')``).

        ``H' = ceil(H / patch)``: the image is zero-padded at the bottom/right first."""
        height, width = images.shape[-2:]
        images = F.pad(images, (0, (-width) % self.patch, 0, (-height) % self.patch))
        x = self.projection(images)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: pad to even size, gather in Unfold order, LN, Linear."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_channels)
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """``[B, H * W, C]`` -> (``[B, ceil(H/2) * ceil(W/2), C_out]``, new ``(H, W)``)."""
        b, _, c = x.shape
        height, width = hw
        x = F.pad(x.view(b, height, width, c), (0, 0, 0, width % 2, 0, height % 2))
        h2, w2 = (height + 1) // 2, (width + 1) // 2
        # [B, h2, kh, w2, kw, C] -> [B, h2, w2, C, kh, kw]: channel 4c + 2kh + kw (nn.Unfold).
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, h2 * w2, 4 * c)
        return self.reduction(self.norm(x)), (h2, w2)


class FFN(nn.Module):
    """mmcv's two-layer FFN (``layers.0.0`` fc1, exact GELU, ``layers.1`` fc2) with its residual."""

    def __init__(self, dims: int, hidden: int, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        fc1 = nn.Sequential(nn.Linear(dims, hidden), nn.GELU(), nn.Dropout(drop))
        self.layers = nn.Sequential(fc1, nn.Linear(hidden, dims), nn.Dropout(drop))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, identity: Tensor) -> Tensor:
        """``[B, L, C]`` (normalised) and the residual ``[B, L, C]`` -> ``[B, L, C]``."""
        return identity + self.drop_path(self.layers(x))


class SwinBlock(nn.Module):
    """Pre-norm block: ``x + (S)W-MSA(norm1(x))``, then ``x + FFN(norm2(x))``."""

    def __init__(self, dims: int, num_heads: int, window: int, shift: bool, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = ShiftWindowMSA(dims, num_heads, window, window // 2 if shift else 0, qkv_bias,
                                   attn_drop, drop, drop_path)
        self.norm2 = nn.LayerNorm(dims)
        self.ffn = FFN(dims, int(mlp_ratio * dims), drop, drop_path)

    def forward(self, x: Tensor, hw: tuple[int, int], mask: Tensor | None) -> Tensor:
        """``[B, H * W, C]`` -> same; ``mask`` is the stage's shift mask (used if this shifts)."""
        x = x + self.attn(self.norm1(x), hw, mask)
        return self.ffn(self.norm2(x), x)


class SwinStage(nn.Module):
    """``depth`` blocks (odd ones shifted) and an optional :class:`PatchMerging` at the end."""

    def __init__(self, dims: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_paths: list[float],
                 downsample: bool) -> None:
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dims, num_heads, window, j % 2 == 1, mlp_ratio, qkv_bias, drop, attn_drop,
                      drop_paths[j]) for j in range(depth))
        self.downsample = PatchMerging(dims, 2 * dims) if downsample else None
        self.with_cp = False

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int], Tensor]:
        """``[B, H * W, C]`` -> (next stage's input ``[B, L', C']``, its ``(H, W)``, this stage's
        output ``[B, H * W, C]`` before the patch merging)."""
        mask = None
        if len(self.blocks) > 1:  # block 1 shifts: one mask serves every shifted block
            padded = self.blocks[1].attn.padded_size(*hw)
            mask = shift_attention_mask(*padded, self.window, self.window // 2, x.device)
        for block in self.blocks:
            if self.with_cp and x.requires_grad and torch.is_grad_enabled():
                x = checkpoint(block, x, hw, mask, use_reentrant=False)
            else:
                x = block(x, hw, mask)
        if self.downsample is None:
            return x, hw, x
        down, down_hw = self.downsample(x, hw)
        return down, down_hw, x


class SwinTransformer(nn.Module):
    """mmdet's ``SwinTransformer`` (no absolute position embedding, patch norm on).

    Args:
        embed_dims: channels of stage 0 (doubled by each patch merging).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window: window side (7 for the 224 px, 12 for the 384 px pretrainings).
        out_indices: stages to return (each gets its ``norm{i}``), ascending.
        patch_size: patch-embedding stride (4).
        mlp_ratio: FFN hidden width / channels.
        qkv_bias: bias of the qkv projections.
        drop_rate: dropout after attention projection and in the FFN.
        attn_drop_rate: attention-weight dropout.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks (training only).
        with_cp: recompute each block in backward (activation checkpointing) when gradients flow.

    Attributes:
        out_channels: channels of each returned level.
        strides: stride of each returned level (4, 8, 16, 32 for stages 0-3).
    """

    def __init__(self, embed_dims: int, depths: tuple[int, ...], num_heads: tuple[int, ...],
                 window: int, out_indices: tuple[int, ...] = (0, 1, 2, 3), patch_size: int = 4,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 with_cp: bool = False) -> None:
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        out_indices = tuple(out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) \
                or not 0 <= out_indices[0] or out_indices[-1] >= num_stages:
            raise ValueError(f"out_indices must be ascending stages in 0..{num_stages - 1}, "
                             f"got {out_indices}")
        self.out_indices = out_indices
        self.num_features = [embed_dims * 2 ** i for i in range(num_stages)]
        self.out_channels = [self.num_features[i] for i in out_indices]
        self.strides = [patch_size * 2 ** i for i in out_indices]
        self.patch_embed = PatchEmbed(3, embed_dims, patch_size)
        total = sum(depths)  # linear 0 -> drop_path_rate (plain Python: works on the meta device)
        rates = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(SwinStage(
                self.num_features[i], depth, num_heads[i], window, mlp_ratio, qkv_bias, drop_rate,
                attn_drop_rate, rates[start:start + depth], downsample=i < num_stages - 1))
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.set_activation_checkpoint(with_cp)
        self.init_weights()

    def set_activation_checkpoint(self, enabled: bool) -> None:
        """Turn per-block activation checkpointing on or off."""
        for stage in self.stages:
            stage.with_cp = enabled

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original Swin's from-scratch init: trunc-normal(0.02) Linear weights and bias
        tables, zero Linear biases, LayerNorm (1, 0); the patch conv keeps PyTorch's default."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(param, std=0.02)

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook of ``load_backbone_weights``: original-Swin / timm checkpoints to mmdet names.

        See :func:`codetr.model.swin_weights.to_mmdet_swin_state_dict`.
        """
        return to_mmdet_swin_state_dict(state_dict, self.state_dict())

    def forward(self, images: Tensor) -> list[Tensor]:
        """Per-stage feature maps.

        Args:
            images: float ``[B, 3, H, W]`` (normalised; any H, W).

        Returns:
            For each of ``out_indices``: ``[B, out_channels[k], H_k, W_k]`` contiguous NCHW, after
            its ``norm{i}``, with ``H_0 = ceil(H / 4)`` and ``H_{i+1} = ceil(H_i / 2)``.
        """
        x, hw = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.stages[: self.out_indices[-1] + 1]):  # later ones unused
            x, next_hw, out = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, *hw, out.shape[-1]).permute(0, 3, 1, 2).contiguous())
            hw = next_hw
        return outs
