"""Optimisation: frozen parameters, parameter groups, optimizer and the learning-rate schedule.

Learning rates follow DINO/TAO: `lr` for the transformer and heads, `lr_backbone` for the backbone
trunk `backbone.body.*`, `lr * lr_linear_proj_mult` for the deformable-attention `sampling_offsets` and
`reference_points` projections, and, for ViT backbones, a layer-wise decay of the backbone rate
(`layer_decay_rate ** (depth + 1 - layer)`, BEiT/ViTDet's rule). The schedule is stepped every
optimizer step: a linear warm-up over `warmup_steps`, then a decay by `lr_decay` at the epochs
`lr_steps` (MultiStep) or every `lr_step_size` epochs (StepLR), as TAO counts them; a resumed
run counts on from the checkpoint's epoch at its own steps per epoch (`lr_factor`'s `origin`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from codetr.spec.errors import SpecError
from codetr.spec.schema import OptimConfig

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")
# TAO's DINO-family module names (seed 000's `freeze` example ["backbone", "transformer.encoder"],
# seed 001's `input_proj`) -> this model's: a prefix that matches nothing as given is retried so.
TAO_MODULE_PREFIXES = (("transformer", "query_head.transformer"), ("input_proj", "neck"))
_BLOCK = re.compile(r"\.blocks\.(\d+)\.")


def freeze_parameters(model: nn.Module, prefixes: Sequence[str]) -> Dict[str, int]:
    """Sets `requires_grad=False` on parameters under each module-name prefix.

    A prefix matches a parameter name equal to it or starting with `prefix + "."`
    (`"query_head.transformer.encoder"` freezes `query_head.transformer.encoder.layers.0.norm1.weight`);
    TAO's names (`TAO_MODULE_PREFIXES`: `transformer.encoder`, `input_proj`) are retried as this
    model's when they match nothing as given.

    Returns:
        {prefix: number of parameter tensors frozen}.

    Raises:
        ValueError: a prefix matches no parameter (a typo would otherwise silently train it).
    """
    counts: Dict[str, int] = {}
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        prefix = prefix.strip().rstrip(".")
        hits = _under(model, prefix)
        for tao, ours in TAO_MODULE_PREFIXES:
            if not hits and (prefix == tao or prefix.startswith(tao + ".")):
                hits = _under(model, ours + prefix[len(tao):])
        if not hits:
            tops = sorted({n.split(".")[0] for n in names})
            raise SpecError(f"train.freeze: '{prefix}' matches no parameter of the model; "
                             f"top-level modules are: {', '.join(tops)}")
        for p in hits:
            p.requires_grad_(False)
        counts[prefix] = len(hits)
    return counts


def _under(model: nn.Module, prefix: str) -> list:
    """The parameters named `prefix` or under the module `prefix`."""
    return [p for name, p in model.named_parameters() if name == prefix or name.startswith(prefix + ".")]


def vit_layer_scale(name: str, num_layers: int, decay_rate: float) -> float:
    """BEiT-style layer decay factor of one backbone parameter.

    Embeddings (`pos_embed`, `patch_embed`, `cls_token`) are layer 0, `blocks.N` layer N + 1, the
    rest (final norm, feature pyramid) layer `num_layers + 1` (factor 1).
    """
    if any(tag in name for tag in (".pos_embed", ".patch_embed", ".cls_token", ".reg_token",
                                   ".mask_token")):
        layer = 0
    else:
        match = _BLOCK.search(name)
        layer = int(match.group(1)) + 1 if match else num_layers + 1
    return decay_rate ** (num_layers + 1 - layer)


@dataclass
class ParamGroup:
    """One optimizer parameter group before it becomes a dict."""
    name: str
    lr: float
    params: List[nn.Parameter]


def build_param_groups(model: nn.Module, cfg: OptimConfig,
                       vit_layer_decay: bool = False) -> List[dict]:
    """Splits trainable parameters into learning-rate groups.

    Args:
        model: the detector (names as in its `named_parameters`).
        cfg: `train.optim`.
        vit_layer_decay: apply `cfg.layer_decay_rate` to `backbone...blocks.N` (ViT backbones only:
            Swin's timm names also contain `blocks.N`, per stage, where the rule is meaningless).

    Returns:
        Dicts with `params`, `lr`, `initial_lr`-free `name`, ready for the optimizer.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depth = 0
    if vit_layer_decay:
        blocks = [int(m.group(1)) for n, _ in named if n.startswith("backbone.")
                  for m in [_BLOCK.search(n)] if m]
        depth = max(blocks) + 1 if blocks else 0
    groups: Dict[str, ParamGroup] = {}
    for name, p in named:
        if name.startswith("backbone.body."):  # the pretrained trunk; a ViT pyramid is new
            lr, key = cfg.lr_backbone, "backbone"
            if vit_layer_decay and depth:
                scale = vit_layer_scale(name, depth, cfg.layer_decay_rate)
                lr, key = lr * scale, f"backbone_x{scale:.4g}"
        elif any(tag in name for tag in LINEAR_PROJ_NAMES):
            lr, key = cfg.lr * cfg.lr_linear_proj_mult, "linear_proj"
        else:
            lr, key = cfg.lr, "base"
        groups.setdefault(key, ParamGroup(key, lr, [])).params.append(p)
    if not groups:
        raise SpecError("no trainable parameters: train.freeze (or train_backbone) froze everything")
    return [{"params": g.params, "lr": g.lr, "name": g.name} for g in groups.values()]


def _fusable(groups: List[dict]) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter: dense floating tensors on CPU
    or CUDA, all on one device."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
                    for p in params))


def build_optimizer(groups: List[dict], cfg: OptimConfig, allow_fused: bool = True
                    ) -> torch.optim.Optimizer:
    """AdamW or SGD (with `momentum`) over `groups`, with `weight_decay` on every group.

    With `allow_fused`, AdamW uses torch's fused kernel when the parameters allow it (one update
    kernel per parameter instead of a chain of element-wise ops), with the same update up to
    float rounding; on the CPU it is never slower than the multi-tensor path and up to 3x faster
    (BENCHMARKS.md, "Training step cost"). The trainer disallows it under mixed precision, where Lightning refuses to clip
    the gradients of an optimizer that unscales them itself.
    """
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=(allow_fused and _fusable(groups)) or None)
    if cfg.optimizer == "SGD":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optim.optimizer={cfg.optimizer!r} is not supported (AdamW, SGD)")


def lr_factor(step: int, steps_per_epoch: int, scheduler: str, lr_steps: Sequence[int],
              lr_step_size: int, lr_decay: float, warmup_steps: int,
              origin: Sequence[int] = (0, 0)) -> float:
    """The multiplier of every group's base learning rate after `step` optimizer steps.

    Args:
        step: optimizer steps taken so far (0 for the first step).
        steps_per_epoch: optimizer steps per epoch (to turn steps into epochs).
        scheduler: 'MultiStep' (decay at each epoch in `lr_steps`) or 'StepLR' (every
            `lr_step_size` epochs).
        lr_decay: the decay factor.
        warmup_steps: linear warm-up from 1/warmup_steps to 1 over the first steps (0: none).
        origin: (epoch, step) where this run started: (0, 0), or the epoch end a resumed run
            picked up from. The epochs after it are counted at THIS run's `steps_per_epoch`, which
            a resume on another GPU count or batch size changes (TAO steps its schedulers per
            epoch, so its decay epochs do not move with them).
    """
    start_epoch, start_step = origin
    epoch = start_epoch + max(0, step - start_step) // max(1, steps_per_epoch)
    if scheduler == "MultiStep":
        decays = sum(1 for m in lr_steps if epoch >= m)
    elif scheduler == "StepLR":
        decays = epoch // lr_step_size
    else:
        raise ValueError(f"train.optim.lr_scheduler={scheduler!r} is not supported (MultiStep, StepLR)")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * lr_decay ** decays


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    origin: Optional[List[int]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step `LambdaLR` applying `lr_factor` (its state dict holds numbers only).

    `origin`: a `[epoch, step]` list read at every step, which the caller sets once a resumed
    run's position is known (after the checkpoint is restored); None: `[0, 0]`.
    """
    fn = functools.partial(lr_factor, steps_per_epoch=steps_per_epoch, scheduler=cfg.lr_scheduler,
                           lr_steps=tuple(cfg.lr_steps), lr_step_size=cfg.lr_step_size,
                           lr_decay=cfg.lr_decay, warmup_steps=cfg.warmup_steps,
                           origin=[0, 0] if origin is None else origin)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def describe_groups(groups: List[dict]) -> str:
    """One line per group: name, learning rate, tensor and element counts (for `verbose`)."""
    return "\n".join(f"  {g['name']}: lr {g['lr']:.3g}, {len(g['params'])} tensors, "
                     f"{sum(p.numel() for p in g['params']):,} parameters" for g in groups)


def optional_steps(value: Optional[int]) -> int:
    """Lightning's `estimated_stepping_batches` may be inf for an unsized loader: fall back to 1."""
    if value is None or value == float("inf"):
        return 1
    return max(1, int(value))
