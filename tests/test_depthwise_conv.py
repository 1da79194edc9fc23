"""The depthwise convolution whose weight gradient is a depthwise convolution (CPU training).

References: PyTorch autograd of `F.conv2d(groups=C)` (oneDNN / the native kernels) and
`torch.autograd.gradcheck` (finite differences in float64). Fresh random inputs per check.
Tolerances: float64 1e-10 (both sides are exact sums of the same products, reordered); float32
2e-5 relative to the gradient's largest entry (a weight-gradient entry sums B * Ho * Wo products
in a different order on the two routes, ~1e-7 relative per rounding, a few hundred terms).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from codetr.model.backbone import Backbone
from codetr.model.fast_depthwise import DepthwiseConv2d, is_swappable
from codetr.ops.depthwise_conv import (_DepthwiseConv2d, depthwise_conv2d,
                                       depthwise_weight_grad, onednn_weight_grad,
                                       transposed_weight_grad_applies)


def _reference_weight_grad(x, w, grad, stride, padding, dilation):
    w = w.detach().requires_grad_(True)
    out = F.conv2d(x, w, None, stride, padding, dilation, x.shape[1])
    return torch.autograd.grad(out, w, grad)[0]


def test_weight_grad_matches_autograd_on_random_shapes():
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs each run; the seed is in the message
    gen = torch.Generator().manual_seed(seed)
    for trial in range(30):
        k, s, d = (3, 5, 7)[trial % 3], (1, 2, 3)[(trial // 3) % 3], (1, 2)[(trial // 9) % 2]
        b, c = int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(1, 7, (), generator=gen))
        p = (int(torch.randint(0, 4, (), generator=gen)), int(torch.randint(0, 3, (), generator=gen)))
        h = int(torch.randint(d * (k - 1) + 1, 19, (), generator=gen))
        w_ = int(torch.randint(d * (k - 1) + 1, 19, (), generator=gen))
        x = torch.randn(b, c, h, w_, dtype=torch.float64, generator=gen)
        weight = torch.randn(c, 1, k, k, dtype=torch.float64, generator=gen)
        out = F.conv2d(x, weight, None, s, p, d, c)
        grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
        got = depthwise_weight_grad(grad, x, (k, k), (s, s), p, (d, d))
        want = _reference_weight_grad(x, weight, grad, s, p, d)
        assert got.shape == want.shape == weight.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10,
                                   msg=f"seed {seed}: b{b} c{c} {h}x{w_} k{k} s{s} p{p} d{d}")


def test_weight_grad_float32_channels_last_trunk_shape():
    x = torch.randn(4, 1152, 4, 4).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(1152, 1, 5, 5).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 1152, 4, 4).contiguous(memory_format=torch.channels_last)
    got = depthwise_weight_grad(grad, x, (5, 5), (1, 1), (2, 2), (1, 1))
    want = _reference_weight_grad(x, weight, grad, 1, 2, 1)
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()


def test_function_passes_gradcheck():
    for stride, padding, dilation, size in (((1, 1), (2, 2), (1, 1), (7, 9)),
                                             ((2, 2), (0, 1), (1, 1), (9, 8)),
                                             ((1, 2), (1, 0), (2, 1), (10, 7))):
        x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(3, 1, 5, 3, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b_, c_: _DepthwiseConv2d.apply(a, b_, c_, stride, padding, dilation),
            (x, weight, bias))


def test_rule_picks_the_route_by_shape_only():
    cl = torch.channels_last
    small = torch.randn(4, 1152, 4, 4).contiguous(memory_format=cl)
    k5, k3 = torch.randn(1152, 1, 5, 5), torch.randn(1152, 1, 3, 3)
    assert transposed_weight_grad_applies(small, k5, (1, 1), (4, 4))
    assert not transposed_weight_grad_applies(small, k3, (1, 1), (4, 4))  # oneDNN 3x3 is fast
    assert not transposed_weight_grad_applies(small.double(), k5.double(), (1, 1), (4, 4))
    big = torch.randn(8, 672, 16, 16)
    assert not transposed_weight_grad_applies(big, k5[:672], (1, 1), (16, 16))  # large maps
    assert transposed_weight_grad_applies(torch.randn(4, 672, 11, 11), k5[:672], (2, 2), (4, 4))
    assert not transposed_weight_grad_applies(torch.randn(4, 144, 35, 35), k5[:144], (2, 2),
                                              (16, 16))
    assert not transposed_weight_grad_applies(small.to("meta"), k5.to("meta"), (1, 1), (4, 4))


def test_depthwise_conv2d_routes_and_values():
    x = torch.randn(2, 96, 6, 6, requires_grad=True)
    weight = torch.randn(96, 1, 5, 5, requires_grad=True)
    bias = torch.randn(96, requires_grad=True)
    out = depthwise_conv2d(x, weight, bias, 1, 2)
    assert "_DepthwiseConv2d" in type(out.grad_fn).__name__
    ref = F.conv2d(x, weight, bias, 1, 2, 1, 96)
    assert torch.equal(out, ref)  # the forward IS F.conv2d
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    want = torch.autograd.grad(ref, (x, weight, bias), grad)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the same oneDNN input grad
    assert (got[1] - want[1]).abs().max() <= 2e-5 * want[1].abs().max()
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-5)
    plain = depthwise_conv2d(x, weight[:, :, :3, :3], None, 1, 1)  # 3x3: oneDNN's route
    assert "Convolution" in type(plain.grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(depthwise_conv2d(x, weight, bias, 1, 2), ref.detach())
    with onednn_weight_grad():  # the benchmarks' "before"
        assert "Convolution" in type(depthwise_conv2d(x, weight, bias, 1, 2).grad_fn).__name__
    assert "_DepthwiseConv2d" in type(depthwise_conv2d(x, weight, bias, 1, 2).grad_fn).__name__


def test_swapped_conv2d_same_keeps_parameters_and_values():
    conv = Conv2dSame(8, 8, 5, stride=2, groups=8, bias=True)
    assert is_swappable(conv) and not is_swappable(nn.Conv2d(8, 16, 5, groups=8))
    swapped = DepthwiseConv2d.from_conv(conv)
    assert swapped.weight is conv.weight and swapped.bias is conv.bias
    assert list(swapped.state_dict()) == list(conv.state_dict())
    x = torch.randn(3, 8, 7, 8, requires_grad=True)  # odd size: asymmetric "same" padding
    out, ref = swapped(x), conv(x)
    assert "_DepthwiseConv2d" in type(out.grad_fn).__name__  # 4x4 output: the transposed route
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    got, want = (torch.autograd.grad(o, (x, conv.weight, conv.bias), grad) for o in (out, ref))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max()


def test_backbone_trunk_swapped_same_state_and_values():
    fast = Backbone("efficientnet_lite0", [1, 2, 3])
    kinds = [type(m) for m in fast.body.modules()]
    assert kinds.count(DepthwiseConv2d) == 16  # every depthwise conv of EfficientNet-Lite0
    plain = Backbone("efficientnet_lite0", [1, 2, 3])
    for parent in plain.body.modules():  # undo the swap: the stock timm convs as reference
        for name, child in list(parent.named_children()):
            if isinstance(child, DepthwiseConv2d):
                conv = (Conv2dSame if child.same_pad else nn.Conv2d)(
                    child.in_channels, child.out_channels, child.kernel_size, child.stride,
                    0 if child.same_pad else child.padding, child.dilation, child.groups,
                    child.bias is not None)
                setattr(parent, name, conv.to(memory_format=torch.channels_last))
    assert list(plain.state_dict()) == list(fast.state_dict())
    plain.load_state_dict(fast.state_dict())
    fast.train(), plain.train()
    images = torch.randn(2, 3, 96, 96)
    outs = [m(images) for m in (fast, plain)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    weights = [torch.randn_like(f) for f in outs[0]]
    for model, feats in zip((fast, plain), outs):
        model.zero_grad()
        sum((f * w).sum() for f, w in zip(feats, weights)).backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert (p.grad - q.grad).abs().max() <= 2e-5 * q.grad.abs().max() + 1e-12, name


def test_cpu_autocast_takes_onednn_route_and_backward_runs():
    x = torch.randn(2, 96, 4, 4, requires_grad=True)
    weight = torch.randn(96, 1, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv2d(x, weight, None, 1, 2)
    assert "_DepthwiseConv2d" not in type(out.grad_fn).__name__
    out.float().sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
