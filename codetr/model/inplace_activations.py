"""In-place activations that copy their input under autograd run out of place when grad flows.

An in-place activation whose backward needs its INPUT (ReLU6 = hardtanh, SiLU, Hardswish,
Hardsigmoid, Mish, Threshold) cannot overwrite that input when gradients flow: PyTorch 2.x then
clones the input, runs the out-of-place kernel and copies the result back, two extra passes over
the activation for nothing. The plain form computes the same values into a new tensor and
autograd saves the input it already has (the memory held for backward is the same). Without
grad (evaluation, export) the in-place form has no clone and skips an allocation, so it stays.
ReLU, whose backward reads the output, is in place either way (no clone). Measured on the
default model's training step (`bench/step_profile.py --variants ours_no_co --profile`, BENCHMARKS.md):
`aten::copy_` 22.3 / 19.1 ms per step before, 18.3 / 17.2 ms after (the 32 ReLU6 of the
EfficientNet-Lite0 trunk); the step time itself moves less than this machine's noise.
"""
import copy

import torch
from torch import Tensor, nn

# Checked on torch 2.14: the in-place form with grad calls aten::clone (the tests re-check it).
CLONING_INPLACE = (nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Threshold)


class InplaceWithoutGrad(nn.Module):
    """Runs `act` in place when no gradient flows through its input, out of place when one does.

    `act` is one of `CLONING_INPLACE` built with ``inplace=True``; it has no parameters or
    buffers, so wrapping it changes no state dict key. The out-of-place twin is a shallow copy
    kept outside the module tree; neither is mutated in `forward` (safe across threads).
    """

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        plain = copy.copy(act)
        plain.inplace = False
        self.__dict__["plain_act"] = plain  # not a submodule: no second entry in the tree

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> same shape, the values of ``act(x)``."""
        if torch.is_grad_enabled() and x.requires_grad:
            return self.plain_act(x)
        return self.act(x)


def grad_aware_inplace(module: nn.Module) -> int:
    """Wraps every in-place `CLONING_INPLACE` submodule of `module` in `InplaceWithoutGrad`.

    Values, parameters and state dict keys do not change. Returns the number wrapped.
    """
    wrapped = 0
    for parent in list(module.modules()):
        if isinstance(parent, InplaceWithoutGrad):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, CLONING_INPLACE) and getattr(child, "inplace", False):
                setattr(parent, name, InplaceWithoutGrad(child))
                wrapped += 1
    return wrapped
