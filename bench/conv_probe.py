"""Are the EfficientNet-Lite0 trunk's depthwise and 1x1 convolutions cheaper in another form?

Forward + backward of each conv shape the default model's trunk runs at 128 px, batch 4
(channels_last, 1 thread, process CPU time, best of 5 after a warm-up), against two restructured
depthwise formulations (k*k shifted multiply-adds; `F.unfold` + a weighted sum) and the 1x1
convs as `F.linear` on the channels_last view. Each alternative is checked against
`F.conv2d` first (atol 1e-4 on random inputs).

    .venv/bin/python bench/conv_probe.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

# (batch, channels, h, w, kernel, stride) of the trunk's depthwise convs at 128 px, batch 4
DEPTHWISE = [(4, 1152, 4, 4, 5, 1), (4, 672, 8, 8, 5, 1), (4, 672, 11, 11, 5, 2),
             (4, 144, 35, 35, 5, 2), (4, 96, 65, 65, 3, 2), (4, 240, 16, 16, 5, 1),
             (4, 480, 8, 8, 3, 1), (4, 144, 32, 32, 3, 1)]
# (batch, in, h, w, out) of its pointwise convs
POINTWISE = [(4, 144, 32, 32, 24), (4, 24, 32, 32, 144), (4, 240, 16, 16, 40), (4, 40, 16, 16, 240),
             (4, 480, 8, 8, 80), (4, 672, 8, 8, 112), (4, 1152, 4, 4, 192), (4, 192, 4, 4, 1152)]


def depthwise_conv(x, w, stride, pad):
    return F.conv2d(x, w, stride=stride, padding=pad, groups=x.shape[1])


def depthwise_shift(x, w, stride, pad):
    k = w.shape[-1]
    xp = F.pad(x, (pad,) * 4) if pad else x
    h, wd = (xp.shape[2] - k) // stride + 1, (xp.shape[3] - k) // stride + 1
    taps = w.view(1, -1, k, k)
    out = None
    for i in range(k):
        for j in range(k):
            t = xp[:, :, i:i + stride * (h - 1) + 1:stride, j:j + stride * (wd - 1) + 1:stride] \
                * taps[:, :, i:i + 1, j:j + 1]
            out = t if out is None else out + t
    return out


def depthwise_unfold(x, w, stride, pad):
    k = w.shape[-1]
    n, c, h, wd = x.shape
    cols = F.unfold(x, k, padding=pad, stride=stride).view(n, c, k * k, -1)
    out = (cols * w.view(1, c, k * k, 1)).sum(2)
    return out.view(n, c, (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1)


def pointwise_conv(x, w):
    return F.conv2d(x, w)


def pointwise_linear(x, w):
    return F.linear(x.permute(0, 2, 3, 1), w.flatten(1)).permute(0, 3, 1, 2)


def best_ms(fn, *args) -> float:
    out = fn(*args)
    grad = torch.randn_like(out)
    times = []
    for _ in range(6):
        t0 = time.process_time()
        fn(*args).backward(grad)
        times.append(time.process_time() - t0)
    return 1e3 * min(times[1:])


def main() -> None:
    torch.set_num_threads(1)
    cl = torch.channels_last
    print("depthwise fwd+bwd ms: conv2d / shifted adds / unfold")
    for n, c, h, wd, k, s in DEPTHWISE:
        pad = 0 if s == 2 else k // 2
        x = torch.randn(n, c, h, wd).contiguous(memory_format=cl).requires_grad_()
        w = torch.randn(c, 1, k, k).contiguous(memory_format=cl).requires_grad_()
        ref = depthwise_conv(x, w, s, pad)
        row = []
        for fn in (depthwise_conv, depthwise_shift, depthwise_unfold):
            assert torch.allclose(fn(x, w, s, pad), ref, atol=1e-4)
            row.append(best_ms(fn, x, w, s, pad))
        print(f"  {(n, c, h, wd, k, s)}: " + " / ".join(f"{v:.2f}" for v in row))
    total = [0.0, 0.0]
    print("pointwise fwd+bwd ms: conv2d / linear on the channels_last view")
    for n, c, h, wd, o in POINTWISE:
        x = torch.randn(n, c, h, wd).contiguous(memory_format=cl).requires_grad_()
        w = torch.randn(o, c, 1, 1).contiguous(memory_format=cl).requires_grad_()
        assert torch.allclose(pointwise_linear(x, w), pointwise_conv(x, w), atol=1e-3)
        row = [best_ms(pointwise_conv, x, w), best_ms(pointwise_linear, x, w)]
        total = [a + b for a, b in zip(total, row)]
        print(f"  {(n, c, h, wd, o)}: {row[0]:.2f} / {row[1]:.2f}")
    print(f"pointwise total: {total[0]:.2f} / {total[1]:.2f} ms")


if __name__ == "__main__":
    main()
