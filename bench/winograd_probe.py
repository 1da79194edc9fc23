"""Would Winograd F(2x2, 3x3) make the ATSS co-head's tower convolution cheaper on this CPU?

The tower convolution (the stacked form of `CoATSSHead.forward`: 128 -> 256 channels, 3x3,
padding 1, maps 16/8/4/2 at batch 4) is most of the co-head's cost, and oneDNN already runs it
near the matmul rate (`bench/conv_probe.py --atss`), so only fewer multiplications could make
it much cheaper. Winograd's F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile
with 16 channel GEMMs instead of 36 multiply-adds per output cell (2.25x fewer FLOPs), at the
price of transforming the input tiles, the weights and the outputs. Here it is written in
PyTorch ops (so autograd gives both gradients), checked against a float64 `F.conv2d`, and
timed forward + backward against `F.conv2d` (1 thread, process CPU time, median of 15), with
its 16 batched GEMMs alone (forward + both gradients) as the part the FLOP saving applies to.

    .venv/bin/python bench/winograd_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_parts import cpu_ms  # noqa: E402  (median process-CPU ms after a warm-up)

# F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A, as Kronecker products
# acting on row-major flattened tiles.
B_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float32)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float32)
A_T = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float32)
INPUT_T, WEIGHT_T, OUTPUT_T = torch.kron(B_T, B_T), torch.kron(G, G), torch.kron(A_T, A_T)
REPEATS = 15


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.conv2d(x, weight, padding=1)` for `[B, C, H, W]` x (H, W even), `[K, C, 3, 3]` weight."""
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    tiles_h, tiles_w = height // 2, width // 2
    u = (weight.reshape(out_channels * channels, 9) @ WEIGHT_T.T)         # [K*C, 16]
    u = u.view(out_channels, channels, 16).permute(2, 1, 0)               # [16, C, K]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))              # [B, H+2, W+2, C]
    d = padded.unfold(1, 4, 2).unfold(2, 4, 2).reshape(-1, 16)            # [B*th*tw*C, 16]
    v = (d @ INPUT_T.T).view(batch * tiles_h * tiles_w, channels, 16).permute(2, 0, 1)
    m = torch.bmm(v, u)                                                   # [16, T, K]
    y = OUTPUT_T @ m.reshape(16, -1)                                      # [4, T*K]
    y = y.view(2, 2, batch, tiles_h, tiles_w, out_channels)
    return y.permute(2, 5, 3, 0, 4, 1).reshape(batch, out_channels, height, width)


def fwd_bwd(conv, x: torch.Tensor, weight: torch.Tensor):
    def run() -> None:
        xx, ww = x.detach().requires_grad_(), weight.detach().requires_grad_()
        y = conv(xx, ww)
        y.backward(torch.ones_like(y))
    return run


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    batch, channels, out_channels = 4, 128, 256
    weight = torch.randn(out_channels, channels, 3, 3, generator=gen) * 0.05
    print("fwd+bwd ms: F.conv2d (oneDNN) / Winograd F(2x2,3x3) in torch ops / its 16 GEMMs alone;"
          " max rel. error vs float64")
    totals = [0.0, 0.0, 0.0]
    for side in (16, 8, 4, 2):
        x = torch.randn(batch, channels, side, side, generator=gen)
        ref = F.conv2d(x.double(), weight.double(), padding=1)
        err = ((winograd_conv3x3(x, weight).double() - ref).abs().max() / ref.abs().max()).item()
        direct = cpu_ms(fwd_bwd(lambda a, w: F.conv2d(a, w, padding=1), x, weight), REPEATS)
        wino = cpu_ms(fwd_bwd(winograd_conv3x3, x, weight), REPEATS)
        tiles = batch * (side // 2) ** 2
        v = torch.randn(16, tiles, channels, generator=gen)
        u = torch.randn(16, channels, out_channels, generator=gen)
        gemms = cpu_ms(fwd_bwd(torch.bmm, v, u), REPEATS)
        for k, ms in enumerate((direct, wino, gemms)):
            totals[k] += ms
        print(f"  {side}x{side}: {direct:.2f} / {wino:.2f} / {gemms:.2f}   error {err:.1e}")
    print("sum: " + " / ".join(f"{t:.2f}" for t in totals) + " ms")


if __name__ == "__main__":
    main()
