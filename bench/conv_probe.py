"""Are the EfficientNet-Lite0 trunk's depthwise and 1x1 convolutions cheaper in another form?

Forward + backward of each conv shape the default model's trunk runs at 128 px, batch 4
(channels_last, 1 thread, process CPU time, best of 5 after a warm-up), against two restructured
depthwise formulations (k*k shifted multiply-adds; `F.unfold` + a weighted sum) and the 1x1
convs as `F.linear` on the channels_last view. Each alternative is checked against
`F.conv2d` first (atol 1e-4 on random inputs).

`--weight-grad`: the depthwise WEIGHT gradient alone, oneDNN's (`aten::convolution_backward`)
against the transposed route of `codetr.ops.depthwise_conv` (checked first, 2e-5 relative),
with the route that module's shape rule picks, at the trunk's shapes and batches 2 / 4 / 8.

`--atss`: the ATSS co-head's convolutions at the default model's sizes (128 channels, maps
16/8/4/2, batch 4, 4 classes), forward + backward per level, as GFLOP/s against a GEMM of the
same work measured in the same run: the towers as one stacked NCHW convolution (`CoATSSHead.
forward`) and one by one on the memory's channels-last views (`forward_per_tower`), and the
thin output convolutions (class 4, box + centerness 5). How close to the matmul rate the
co-head already runs bounds what any rearrangement can save.

    .venv/bin/python bench/conv_probe.py [--weight-grad | --atss]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from codetr.ops.depthwise_conv import (depthwise_weight_grad,  # noqa: E402
                                       transposed_weight_grad_applies)

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


def weight_grad_table() -> None:
    """oneDNN's depthwise weight gradient against the transposed route, per trunk shape."""
    cl = torch.channels_last
    print("depthwise weight gradient ms (best of 7): oneDNN / transposed route, rule's pick")
    won = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for batch in (2, 4, 8):
        for _, c, h, wd, k, s in DEPTHWISE:
            pad = 0 if s == 2 else k // 2
            x = torch.randn(batch, c, h, wd).contiguous(memory_format=cl)
            w = torch.randn(c, 1, k, k).contiguous(memory_format=cl)
            out = F.conv2d(x, w, None, s, pad, 1, c)
            g = torch.randn(out.shape).contiguous(memory_format=cl)

            def onednn():
                return torch.ops.aten.convolution_backward(
                    g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], c,
                    [False, True, False])[1]

            def transposed():
                return depthwise_weight_grad(g, x, (k, k), (s, s), (pad, pad), (1, 1))

            ref = onednn()
            assert (transposed() - ref).abs().max() <= 2e-5 * ref.abs().max()
            row = [best_of(onednn), best_of(transposed)]
            pick = transposed_weight_grad_applies(x, w, (s, s), out.shape[-2:])
            won[pick] = [a + b for a, b in zip(won[pick], row)]
            print(f"  {(batch, c, h, wd, k, s)}: {row[0]:.2f} / {row[1]:.2f}  "
                  f"{'transposed' if pick else 'oneDNN'}")
    for pick, (a, b) in won.items():
        print(f"shapes routed {'transposed' if pick else 'oneDNN'}: sum {a:.2f} / {b:.2f} ms")


def atss_table(dim: int = 128, batch: int = 4, sides=(16, 8, 4, 2)) -> None:
    """GFLOP/s of the co-head's convolutions (forward + backward = 3x the forward's FLOPs)."""
    cl = torch.channels_last
    cells = batch * sum(s * s for s in sides)
    a, b = torch.randn(cells, 9 * dim), torch.randn(9 * dim, dim)
    gemm = 2 * cells * 9 * dim * dim / best_of(lambda: a @ b) / 1e6
    print(f"GEMM [{cells}, {9 * dim}] x [{9 * dim}, {dim}]: {gemm:.0f} GFLOP/s (the reference)")
    print("fwd+bwd ms (GFLOP/s): stacked towers NCHW / two towers channels-last / "
          "class conv (4) / box + centerness conv (5)")
    totals = [0.0] * 4
    for side in sides:
        memory = torch.randn(batch, side * side, dim)
        memory.requires_grad_()
        view = memory.transpose(1, 2).reshape(batch, dim, side, side)  # the memory's layout
        x_cl = view.detach().contiguous(memory_format=cl).requires_grad_()
        w2, w1, w1b = (torch.randn(o, dim, 3, 3, requires_grad=True) for o in (2 * dim, dim, dim))
        thin = {o: torch.randn(o, dim, 3, 3, requires_grad=True) for o in (4, 5)}

        def fwd_bwd(*outputs):
            torch.autograd.backward(outputs, [torch.ones_like(y) for y in outputs])

        # the stacked form pays for its NCHW copy of the view (and the copy's gradient)
        runs = [(lambda: fwd_bwd(F.conv2d(view.contiguous(), w2, padding=1)), 2 * dim),
                (lambda: fwd_bwd(F.conv2d(view, w1, padding=1), F.conv2d(view, w1b, padding=1)),
                 2 * dim),
                (lambda: fwd_bwd(F.conv2d(x_cl, thin[4], padding=1)), 4),
                (lambda: fwd_bwd(F.conv2d(x_cl, thin[5], padding=1)), 5)]
        row = []
        for k, (fn, out_channels) in enumerate(runs):
            ms = best_of(fn)
            totals[k] += ms
            flops = 3 * 2 * batch * side * side * 9 * dim * out_channels
            row.append(f"{ms:.2f} ({flops / ms / 1e6:.0f})")
        print(f"  {side}x{side}: " + " / ".join(row))
    print("sum ms: " + " / ".join(f"{t:.2f}" for t in totals))


def best_of(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weight-grad", action="store_true")
    parser.add_argument("--atss", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.weight_grad or args.atss:
        (weight_grad_table if args.weight_grad else atss_table)()
        return
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
