"""Eval-time folding: BatchNorm into the preceding convolution, fused query projections.

At inference the running statistics of a BatchNorm are constants, so ``bn(conv(x))`` is one
convolution with scaled weights and a new bias; and every deformable attention layer applies
two linear layers (``sampling_offsets``, ``attention_weights``) to the same query, which one
GEMM with the two weight matrices stacked computes at once. Both leave the outputs unchanged up
to fp32 rounding (tests/test_eval_fold.py) and are applied ONLY for evaluation, inference and
export (``fold_for_eval``), never for training: a folded BatchNorm refuses ``train()``.

Which convolution feeds which BatchNorm is read from one probe forward of the trunk (forward
hooks: a BatchNorm whose input tensor IS a convolution's output), so any timm CNN is covered
without naming its layers; the folded trunk is then checked against the original on the probe
and left unfolded if they differ (a convolution output that also feeds something else).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from codetr.model.deformable_attention import MultiScaleDeformableAttention

# The probe image (a plain random one: folding is exact, the check only guards the pairing).
_PROBE_SIZE = 64
# Folded vs original trunk features on the probe, relative to their scale.
_CHECK_RTOL = 1e-4


class FoldedBatchNorm(nn.Module):
    """What remains of a BatchNorm folded into its convolution: its activation, if it had one.

    timm's ``BatchNormAct2d`` applies dropout and an activation after the normalisation; they
    stay. Training a folded model would silently train without BatchNorm, so ``train()`` raises.
    """

    def __init__(self, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def train(self, mode: bool = True) -> "FoldedBatchNorm":
        if mode:
            raise RuntimeError("this model was folded for evaluation (codetr.model.eval_fold): "
                               "build a fresh model to train")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> same."""
        return self.act(self.drop(x))


def _conv_bn_pairs(trunk: nn.Module, probe: Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, str]]:
    """(conv, bn, bn's qualified name) where the BatchNorm's input is the conv's output."""
    outputs: dict[int, nn.Conv2d] = {}
    calls: dict[nn.Module, int] = {}
    pairs: dict[nn.BatchNorm2d, nn.Conv2d] = {}

    def conv_hook(module, _inputs, output):
        calls[module] = calls.get(module, 0) + 1
        outputs[id(output)] = module

    def bn_hook(module, inputs):
        calls[module] = calls.get(module, 0) + 1
        conv = outputs.get(id(inputs[0]))
        if conv is not None:
            pairs[module] = conv

    handles = []
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            features = trunk(probe)  # kept alive: output ids stay unique during the pass
    finally:
        for h in handles:
            h.remove()
    del features
    names = {m: n for n, m in trunk.named_modules()}
    convs = list(pairs.values())
    # Only modules called once, each conv feeding one BatchNorm: shared modules are left alone.
    return [(conv, bn, names[bn]) for bn, conv in pairs.items()
            if calls[bn] == 1 and calls[conv] == 1 and convs.count(conv) == 1
            and bn.track_running_stats and bn.running_mean is not None]


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Conv weights and bias absorb the BatchNorm's eval-mode affine map."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.mul_(scale).add_(shift)


def fold_batch_norms(trunk: nn.Module, probe: Tensor) -> int:
    """Folds every BatchNorm that directly follows a convolution of ``trunk`` (eval mode).

    Args:
        trunk: a CNN; put in eval mode.
        probe: ``[1, 3, H, W]`` input the trunk accepts.

    Returns:
        The number of BatchNorms folded (0 when the folded trunk did not match the original on
        ``probe``: then ``trunk`` is left as it was).
    """
    trunk.eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()):
        return 0
    original = copy.deepcopy(trunk)
    pairs = _conv_bn_pairs(trunk, probe)
    for conv, bn, name in pairs:
        _fold_pair(conv, bn)
        parent_name, _, attr = name.rpartition(".")
        parent = trunk.get_submodule(parent_name) if parent_name else trunk
        setattr(parent, attr, FoldedBatchNorm(getattr(bn, "drop", None), getattr(bn, "act", None)))
    with torch.no_grad():
        before, after = _flat(original(probe)), _flat(trunk(probe))
    if any((a - b).abs().max() > _CHECK_RTOL * (1 + b.abs().max()) for a, b in zip(after, before)):
        for name, module in original.named_children():  # not reached for the timm CNNs here
            setattr(trunk, name, module)
        return 0
    return len(pairs)


def _flat(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]


def fold_for_eval(model: nn.Module) -> dict[str, int]:
    """Folds a detector for evaluation, inference or export, in place; puts it in eval mode.

    Args:
        model: a ``CoDETR`` (or any module): its ``backbone`` (when it has one) gets its
            BatchNorms folded, every ``MultiScaleDeformableAttention`` its query projections fused.

    Returns:
        ``{"batch_norms": folded, "projections": fused layers}``.
    """
    model.eval()
    folded = 0
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        probe = torch.randn(1, 3, _PROBE_SIZE, _PROBE_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
        probe = probe.to(memory_format=getattr(backbone, "memory_format", torch.contiguous_format))
        folded = fold_batch_norms(backbone, probe)
    fused = 0
    for m in model.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m.fuse_query_projections()
            fused += 1
    return {"batch_norms": folded, "projections": fused}
