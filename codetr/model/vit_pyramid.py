"""Plain ViT trunk (timm DINOv2 family) + ViTDet's simple feature pyramid (SFP).

A plain ViT yields ONE stride-16 map; the SFP turns it into the five pyramid slots
(slot k has stride 2^(k+2)): p2 = two 2x transposed convs, p3 = one, p4 = the map itself,
p5 = 2x2 max-pool, p6 = stride-2 subsampling of p5's output (ViTDet's ``LastLevelMaxPool``).
Every slot then gets Conv1x1 -> LayerNorm2d -> Conv3x3 -> LayerNorm2d (no bias, no activation,
as ViTDet/mmdet ``SimpleFPN``; the only GELU sits between p2's two transposed convs).

DINOv2 uses 14x14 patches, so its token grid has stride 14. Rather than interpolating the token
grid (which misaligns tokens with pixels and with the padding mask), the image is resized by
``patch_size / 16`` so that each token covers exactly a 16x16 pixel cell of the input: the grid
is ``ceil(H / 16) x ceil(W / 16)``, the pretrained patch embedding is used unchanged, and the
token count is that of a patch-16 ViT (the cost ViTDet was designed for).
"""
import math

import timm
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

VIT_STRIDE = 16


def create_vit(timm_name: str, **model_kwargs) -> nn.Module:
    """A randomly initialised timm ViT (no classifier) that accepts any input size.

    Args:
        timm_name: a timm VisionTransformer name, e.g. ``vit_large_patch14_dinov2``.
        **model_kwargs: VisionTransformer arguments overriding the name's (e.g. the SwiGLU MLP
            of NV-DINOv2).

    Returns:
        The timm ``VisionTransformer`` with ``embed_dim``, ``patch_embed.patch_size`` and
        ``forward_intermediates``; its position embedding is interpolated to each input grid.
    """
    vit = timm.create_model(timm_name, pretrained=False, num_classes=0,
                            dynamic_img_size=True, dynamic_img_pad=True, **model_kwargs)
    if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "embed_dim"):
        raise ValueError(f"timm model {timm_name!r} is not a plain ViT with forward_intermediates")
    # Drop the classification head so that no parameter goes unused in detection training.
    vit.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)
    return vit


def vit_feature_map(vit: nn.Module, images: Tensor) -> Tensor:
    """Run the ViT so that its last-block tokens form an exact stride-16 map.

    Args:
        vit: a module from :func:`create_vit`.
        images: float ``[B, 3, H, W]`` normalised images.

    Returns:
        ``[B, embed_dim, ceil(H / 16), ceil(W / 16)]``: last block output after the final norm.
    """
    height, width = images.shape[-2:]
    grid_h, grid_w = math.ceil(height / VIT_STRIDE), math.ceil(width / VIT_STRIDE)
    # Zero padding at bottom/right, like the collate's padding, so cells stay pixel-aligned.
    x = F.pad(images, (0, grid_w * VIT_STRIDE - width, 0, grid_h * VIT_STRIDE - height))
    patch_h, patch_w = vit.patch_embed.patch_size
    if (patch_h, patch_w) != (VIT_STRIDE, VIT_STRIDE):
        x = F.interpolate(x, size=(grid_h * patch_h, grid_w * patch_w), mode="bilinear",
                          align_corners=False, antialias=patch_h < VIT_STRIDE)
    return vit.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW",
                                     intermediates_only=True)[-1]


class _PyramidLevel(nn.Module):
    """Resample the stride-16 map to one slot, then Conv1x1 -> LN -> Conv3x3 -> LN."""

    def __init__(self, resample: nn.Module, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.resample = resample
        self.lateral = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                     LayerNorm2d(out_channels))
        self.output = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                    LayerNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, D, h, w]`` -> ``[B, out_channels, h * s, w * s]`` for the slot's scale s."""
        return self.output(self.lateral(self.resample(x)))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a single stride-16 map.

    Args:
        in_channels: channels D of the ViT map (1024 for ViT-L).
        out_channels: channels of every output slot (256).
        slots: ascending pyramid slots to produce, each in 0..4 (slot k has stride 2^(k+2));
            slot 4 is derived from slot 3's output, so it needs slot 3.
    """

    def __init__(self, in_channels: int, out_channels: int, slots: list[int]) -> None:
        super().__init__()
        if not slots or sorted(set(slots)) != list(slots) or not 0 <= slots[0] <= slots[-1] < 5:
            raise ValueError(f"slots must be ascending, unique, within 0..4; got {slots}")
        if 4 in slots and 3 not in slots:
            raise ValueError("slot 4 (stride 64) is pooled from slot 3: request slot 3 too")
        self.slots = list(slots)
        half, quarter = in_channels // 2, in_channels // 4
        resamplers = {
            0: (nn.Sequential(nn.ConvTranspose2d(in_channels, half, 2, stride=2),
                              LayerNorm2d(half), nn.GELU(),
                              nn.ConvTranspose2d(half, quarter, 2, stride=2)), quarter),
            1: (nn.ConvTranspose2d(in_channels, half, 2, stride=2), half),
            2: (nn.Identity(), in_channels),
            # ceil_mode keeps sizes equal to ceil(H / 32), like a stride-2 3x3 conv would.
            3: (nn.MaxPool2d(2, stride=2, ceil_mode=True), in_channels),
        }
        self.levels = nn.ModuleDict({
            f"p{slot + 2}": _PyramidLevel(resamplers[slot][0], resamplers[slot][1], out_channels)
            for slot in self.slots if slot < 4})

    def forward(self, x: Tensor) -> list[Tensor]:
        """Build the requested slots.

        Args:
            x: ``[B, D, h, w]`` stride-16 map.

        Returns:
            One ``[B, out_channels, ceil(h * 16 / 2^(k+2)), ...]`` tensor per requested slot k,
            finest first.
        """
        outs = [self.levels[f"p{slot + 2}"](x) for slot in self.slots if slot < 4]
        if 4 in self.slots:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs


def vit_strides(slots: list[int]) -> list[int]:
    """Strides of the SFP slots: ``2^(k+2)``."""
    return [2 ** (slot + 2) for slot in slots]

