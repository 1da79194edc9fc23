"""Depthwise convolution whose weight gradient on the CPU is itself a depthwise convolution.

oneDNN (PyTorch's CPU convolution backend) computes the forward and the input gradient of a
depthwise 5x5 convolution quickly but its WEIGHT gradient slowly on small maps: for the
EfficientNet-Lite0 trunk's `[4, 1152, 4, 4]` 5x5 layers it takes ~4.4 ms where the forward takes
~0.2 ms (`bench/conv_probe.py --weight-grad`, BENCHMARKS.md). The weight gradient of a depthwise
convolution is a correlation of each (image, channel) input plane with its output-gradient plane:

    dW[c, i, j] = sum_{b, y, x} g[b, c, y, x] * x_pad[b, c, y * s + i * d, x * s + j * d]

which is one depthwise convolution with B * C groups, the gradient planes as kernels, stride
`d` and dilation `s` (the original stride), summed over the batch. `depthwise_conv2d` computes the
forward and the input gradient with `F.conv2d` / oneDNN as before and takes this route for the
weight gradient where `transposed_weight_grad_applies` says it is faster (a fixed shape rule, so
a run's numbers never depend on timing; the two routes agree to float rounding, ~1e-6 relative).

Tensors: x `[B, C, H, W]` (any memory format), weight `[C, 1, kh, kw]`, bias `[C]` or None,
output `[B, C, Ho, Wo]`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# The rule, from bench/conv_probe.py --weight-grad on this project's 2-core x86 CPU (torch
# 2.14.1, oneDNN): the transposed route wins for kernels of 5 and more at stride 1 up to ~5e5
# output elements, and at stride 2 when the output map is tiny (<= 16 cells); oneDNN's 3x3 weight
# gradient is fast everywhere and large maps favour oneDNN.
MIN_KERNEL = 5
MAX_OUTPUT_ELEMENTS = 1 << 19
MAX_STRIDED_OUTPUT_CELLS = 16
_ONEDNN_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("codetr_dw_onednn", default=False)


@contextlib.contextmanager
def onednn_weight_grad() -> Iterator[None]:
    """Every depthwise conv inside takes oneDNN's weight gradient (for comparisons, benchmarks)."""
    token = _ONEDNN_ONLY.set(True)
    try:
        yield
    finally:
        _ONEDNN_ONLY.reset(token)


def transposed_weight_grad_applies(x: Tensor, weight: Tensor, stride: Sequence[int],
                                   out_hw: Sequence[int]) -> bool:
    """Whether the transposed route is the faster weight gradient for this CPU conv shape."""
    # Under CPU autocast F.conv2d may run in bf16 inside forward while x stays float32: oneDNN's
    # route then (it casts for itself).
    if _ONEDNN_ONLY.get() or x.device.type != "cpu" or x.dtype != torch.float32 \
            or torch.is_autocast_enabled("cpu") or min(weight.shape[-2:]) < MIN_KERNEL:
        return False
    out_cells = int(out_hw[0]) * int(out_hw[1])
    if x.shape[0] * x.shape[1] * out_cells > MAX_OUTPUT_ELEMENTS:
        return False
    return max(stride) == 1 or out_cells <= MAX_STRIDED_OUTPUT_CELLS


def depthwise_weight_grad(grad_out: Tensor, x: Tensor, kernel_size: Sequence[int],
                          stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int]) -> Tensor:
    """`[C, 1, kh, kw]` weight gradient of a depthwise conv of `x` `[B, C, H, W]` given the
    output gradient `grad_out` `[B, C, Ho, Wo]` (zero padding `padding` as in the forward)."""
    batch, channels, height, width = x.shape
    out_h, out_w = grad_out.shape[-2:]
    planes = x.transpose(0, 1).reshape(1, channels * batch, height, width)
    kernels = grad_out.transpose(0, 1).reshape(channels * batch, 1, out_h, out_w)
    corr = F.conv2d(planes, kernels, None, tuple(dilation), tuple(padding), tuple(stride),
                    channels * batch)
    # The correlation can extend past the kernel where (H + 2p - k) is not a multiple of s.
    kh, kw = kernel_size
    return corr.view(channels, batch, corr.shape[-2], corr.shape[-1])[:, :, :kh, :kw] \
        .sum(1, keepdim=True)


class _DepthwiseConv2d(torch.autograd.Function):
    """F.conv2d forward and input gradient; the weight gradient by `depthwise_weight_grad`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: tuple,
                padding: tuple, dilation: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(stride), list(padding), list(dilation), False,
                [0, 0], x.shape[1], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(grad_out, x, weight.shape[-2:], stride, padding,
                                           dilation)  # [C, 1, kh, kw]: one layout for both formats
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     stride=1, padding=0, dilation=1) -> Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)` for `x` `[B, C, H, W]`,
    `weight` `[C, 1, kh, kw]` (integer zero padding): the same forward values, the weight
    gradient by the transposed route where that is faster (see the module docstring)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if weight.requires_grad and torch.is_grad_enabled() and not (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()):
        out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                  zip(x.shape[-2:], padding, dilation, weight.shape[-2:], stride)]
        if transposed_weight_grad_applies(x, weight, stride, out_hw):
            return _DepthwiseConv2d.apply(x, weight, bias, stride, padding, dilation)
    return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])
