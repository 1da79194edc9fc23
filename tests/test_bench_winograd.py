"""bench/winograd_probe.py's Winograd F(2x2, 3x3) is the 3x3 convolution it is timed against.

Float64 on fresh random inputs and weights (exact arithmetic up to rounding: 1e-10), plus the
gradients autograd derives through the transforms (the probe times forward + backward).
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import winograd_probe  # noqa: E402


def test_winograd_is_the_padded_3x3_convolution(monkeypatch):
    for name in ("INPUT_T", "WEIGHT_T", "OUTPUT_T"):
        monkeypatch.setattr(winograd_probe, name, getattr(winograd_probe, name).double())
    for batch, channels, out_channels, height, width in ((2, 5, 7, 6, 4), (1, 3, 2, 2, 8)):
        x = torch.randn(batch, channels, height, width, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(out_channels, channels, 3, 3, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(batch, out_channels, height, width, dtype=torch.float64)
        got = winograd_probe.winograd_conv3x3(x, weight)
        want = F.conv2d(x, weight, padding=1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        got_grads = torch.autograd.grad(got, (x, weight), grad)
        want_grads = torch.autograd.grad(want, (x, weight), grad)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
